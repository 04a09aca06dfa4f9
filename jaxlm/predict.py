"""Predicts for raw text with a trained run: the label, the tags or the translation.

    python -m jaxlm.predict --workdir=DIR --text="a gripping , funny film" [--text=...]

Prints one JSON line per text (a PEFT run loads onto its base from `init_from`).
"""

import json

from absl import app, flags
from absl import logging as absl_logging

from jaxlm.tasks import base
from jaxlm.train import loop

FLAGS = flags.FLAGS


def predict(workdir: str, texts: list[str]) -> list[dict]:
    run, params, _ = loop.restore_latest(workdir)
    task = run.task.serving_task
    if not isinstance(task, base.Predicts):
        raise ValueError(f"task {run.config.task.name!r} does not predict for raw text "
                         "(use python -m jaxlm.generate for language models)")
    return [task.predict_text(params, text) for text in texts]


def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)
    for row in predict(FLAGS.workdir, FLAGS.text):
        print(json.dumps(row, ensure_ascii=False))


if __name__ == "__main__":  # flags only when run: the functions above are imported by tests and tools
    flags.DEFINE_string("workdir", None, "A jaxlm run directory (a fine-tuning or translation task).")
    flags.DEFINE_multi_string("text", None, "Raw text to predict for (repeat the flag for several).")
    flags.mark_flags_as_required(["workdir", "text"])
    app.run(main)
