"""A Llama-style decoder pretrained on your own corpus, in memory or prepared into shards.

    python -m jaxlm.main --config=configs/gpt_corpus.py --config.data.files='/data/text/**/*.txt' --workdir=/tmp/corpus_run
    python tools/prepare_data.py --config=configs/gpt_corpus.py --config.data.files='/data/text/**/*.txt' \
        --output=/tmp/corpus
    python -m jaxlm.main --config=configs/gpt_corpus.py --config.data.prepared=/tmp/corpus --workdir=/tmp/corpus_run

`data.files` (comma-separated globs; every 10th file is validation) is tokenized in memory at
start-up: fine up to a few hundred MB. For larger corpora, `tools/prepare_data.py` tokenizes it
once into ArrayRecord shards and `data.prepared` reads them with random access: start-up time and
memory no longer depend on the corpus. Byte tokenizer (any text, no vocabulary to train), 512-token
windows, 4 layers of width 256 with grouped-query attention, rotary positions, SwiGLU, RMSNorm.
"""

from jaxlm.config import default_config


def get_config():
    config = default_config()
    config.task.name = "causal_lm"
    config.data.update(dict(name="jaxlm_text_files", files="", tokenizer="byte", seq_len=512))
    config.model.update(dict(name="gpt", norm="rmsnorm", positions="rotary", mlp="swiglu", tie_embeddings=True,
                             num_layers=4, emb_dim=256, num_heads=8, num_kv_heads=2, mlp_dim=768, max_len=512,
                             dropout=0.0))
    config.train.update(dict(steps=2000, batch_size=16, log_every=50, eval_every=500, eval_batches=20))
    config.optim.update(dict(lr=1e-3, end_lr=1e-4, warmup_steps=100, b2=0.95, weight_decay=0.1, clip_norm=1.0))
    config.sample.update(dict(prompt="def ", max_new_tokens=64))
    return config
