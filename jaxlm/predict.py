"""Predicts for raw text with a trained run: the label, the tags or the translation.

    python -m jaxlm.predict --workdir=DIR --text="a gripping , funny film" [--text=...]

Prints one JSON line per text (a PEFT run loads onto its base from `init_from`). A text that is
empty or only whitespace is an error naming it (nothing is predicted, the checkpoint not loaded).
"""

import json

from absl import app, flags
from absl import logging as absl_logging

from jaxlm.tasks import base
from jaxlm.train import loop

FLAGS = flags.FLAGS


def predict(workdir: str, texts: list[str]) -> list[dict]:
    """One prediction per text, in order.

    Raises:
      ValueError: a text is empty or only whitespace (named), or the run's task does not predict
        for raw text.
    """
    check_texts(texts)
    run, params, _ = loop.restore_latest(workdir)
    task = run.task.serving_task
    if not isinstance(task, base.Predicts):
        raise ValueError(f"task {run.config.task.name!r} does not predict for raw text "
                         "(use python -m jaxlm.generate for language models)")
    return [task.predict_text(params, text) for text in texts]


def check_texts(texts: list[str]) -> None:
    """Raises ValueError naming each text that is empty or only whitespace: a model would still
    answer for it (from its special tokens alone), an answer that means nothing."""
    empty = [f"#{i} ({text!r})" for i, text in enumerate(texts, 1) if not text.strip()]
    if empty:
        raise ValueError(f"--text {', '.join(empty)} of {len(texts)} "
                         f"{'is' if len(empty) == 1 else 'are'} empty or only whitespace: "
                         "nothing to predict for")


def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        check_texts(FLAGS.text)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    for row in predict(FLAGS.workdir, FLAGS.text):
        print(json.dumps(row, ensure_ascii=False))


def run():
    """The `jaxlm-predict` command; its flags are defined only when run (tests and tools import
    the functions above)."""
    flags.DEFINE_string("workdir", None, "A jaxlm run directory (a fine-tuning or translation task).")
    flags.DEFINE_multi_string("text", None, "Raw text to predict for (repeat the flag for several).")
    flags.mark_flags_as_required(["workdir", "text"])
    app.run(main)


if __name__ == "__main__":
    run()
