"""The offline quickstart: a small byte-level GPT trained on the Python standard library's sources.

    python -m jaxlm.main --config=configs/quickstart.py --workdir=/tmp/quickstart

Every Python install has this corpus, so it runs on a fresh machine with no network; it takes a
few minutes on a laptop CPU (about 3 on 2 cores) and prints a sample of Python-looking text at the end.
"""

import os
import sysconfig

from jaxlm.config import default_config


def get_config():
    config = default_config()
    config.data.name = "jaxlm_text_files"
    config.data.files = os.path.join(sysconfig.get_paths()["stdlib"], "*.py")
    config.data.tokenizer = "byte"
    config.data.seq_len = 128
    config.model.update(dict(num_layers=4, num_heads=4, emb_dim=128, max_len=128,
                             positions="rotary", norm="rmsnorm", mlp="swiglu", mlp_dim=352))
    config.train.update(dict(steps=1500, batch_size=16, log_every=50, eval_every=500,
                             eval_batches=20, steps_per_call=50))
    config.optim.update(dict(lr=2e-3, end_lr=2e-4, warmup_steps=50))
    config.checkpoint.every = 500
    config.sample.update(dict(prompt="def ", max_new_tokens=200, temperature=0.7))
    return config
