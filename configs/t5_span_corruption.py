"""T5.1.1-style span-corruption pretraining on Tiny Shakespeare.

    python -m jaxlm.main --config=configs/t5_span_corruption.py --workdir=/tmp/t5_span

Windows whose corrupted inputs are 128 tokens (15% noise in spans of mean length 3, sentinels
from the top of the vocabulary, targets ~30 tokens); a 4000-piece sentencepiece vocabulary is
trained on the train split at start (pad 0, eos 1); 3+3 pre-RMSNorm layers of width 256 with
relative position buckets plus sinusoidal absolute positions and a gated-GELU MLP; token
embeddings scaled by sqrt(width).
"""

from jaxlm.config import default_config


def t5_model(config):
    """The small T5.1.1 shape shared by the T5 configs."""
    config.model.update(dict(name="t5", num_layers=3, num_decoder_layers=3, num_heads=4, emb_dim=256,
                             head_dim=64, mlp_dim=512, mlp="geglu", norm="rmsnorm", norm_eps=1e-6,
                             dropout=0.1, tie_embeddings=False, init_std=0.05, scan_layers=False,
                             # embeddings of std 0.02 times sqrt(256): with Adam they learn 16x faster
                             # relative to their size; Multi30k BLEU after 800 steps 17.3 -> 21.4
                             embed_init_std=0.02, scale_embeddings=True,
                             # absolute positions too (as torch.nn.Transformer's): Multi30k BLEU after
                             # 800 steps 21.2 -> 26.7, outputs 9.4 -> 10.2 words (references 11.4)
                             positions="sinusoidal"))


def get_config():
    config = default_config()
    config.task.name = "span_corruption"
    config.data.update(dict(name="jaxlm_tiny_shakespeare", tokenizer="sentencepiece", tokenizer_vocab_size=4000,
                            seq_len=128))
    t5_model(config)
    config.model.max_len = 64
    config.train.update(dict(steps=600, batch_size=32, log_every=25, eval_every=200, eval_batches=10,
                             steps_per_call=25))
    config.optim.update(dict(lr=2e-3, end_lr=1e-4, warmup_steps=100, b2=0.999, weight_decay=0.01))
    config.checkpoint.every = 300
    config.sample.max_new_tokens = 0
    return config
