"""Distilling the character-level Shakespeare GPT (4 layers, width 128) into 2 layers of width 64.

    python -m jaxlm.main --config=configs/gpt_shakespeare_char.py --workdir=/tmp/shakespeare
    python -m jaxlm.main --config=configs/distill_shakespeare.py --workdir=/tmp/shakespeare_student \
        --config.distill.teacher=/tmp/shakespeare
    python -m jaxlm.main --config=configs/distill_shakespeare.py:alone --workdir=/tmp/shakespeare_alone

The student starts from scratch on the same data and schedule and learns from the teacher's
next-character distributions (T=2) and the text, half each; `alone` trains it on the text only
(no teacher needed). Compare `eval/loss` of the two, e.g. with `python -m jaxlm.evaluate`.
"""

import os

from jaxlm import config as config_lib


def get_config(arg: str = "distill"):
    if arg not in ("distill", "alone"):
        raise ValueError(f"configs/distill_shakespeare.py: argument {arg!r}: expected 'distill' or 'alone'")
    config = config_lib.from_file(os.path.join(os.path.dirname(__file__), "gpt_shakespeare_char.py"))
    config.task.name = "distillation"
    config.model.update(dict(num_layers=2, num_heads=4, emb_dim=64))
    config.distill.update(dict(student_task="causal_lm", temperature=2.0, soft_weight=0.5, hard_weight=0.5))
    if arg == "alone":
        config.distill.update(dict(soft_weight=0.0, hard_weight=1.0))
    return config
