"""nanoGPT's CPU "baby GPT" recipe on character-level Tiny Shakespeare.

    python -m jaxlm.main --config=configs/gpt_shakespeare_char.py --workdir=/tmp/shakespeare

4 layers, 4 heads, width 128, block 64, batch 12, no dropout, AdamW lr 1e-3 cosine to 1e-4 over
2000 steps after 100 warm-up steps, betas 0.9/0.99, weight decay 0.1, clipping 1.0. The data is
`$JAXLM_DATA_DIR/tinyshakespeare/input.txt`, split 90/10 by characters as nanoGPT does.
"""

from jaxlm.config import default_config


def get_config():
    config = default_config()
    config.data.name = "jaxlm_tiny_shakespeare"
    config.data.tokenizer = "char"
    config.data.seq_len = 64
    config.model.update(dict(num_layers=4, num_heads=4, emb_dim=128, max_len=64, dropout=0.0,
                             scan_layers=False))  # a Python loop of 4 blocks runs faster on CPU
    # Eval every 250 steps on 20 batches as nanoGPT does; for the whole validation split run
    # `python -m jaxlm.evaluate --workdir=DIR` afterwards.
    config.train.update(dict(steps=2000, batch_size=12, log_every=50, eval_every=250,
                             eval_batches=20, steps_per_call=50))
    config.optim.update(dict(lr=1e-3, end_lr=1e-4, warmup_steps=100, b1=0.9, b2=0.99,
                             weight_decay=0.1, clip_norm=1.0))
    config.checkpoint.every = 1000
    config.sample.update(dict(prompt="ROMEO:", max_new_tokens=50))  # more: python -m jaxlm.generate
    return config
