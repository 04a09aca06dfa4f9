"""Evaluates the latest checkpoint of a run: `python -m jaxlm.evaluate --workdir=DIR`.

    python -m jaxlm.evaluate --workdir=DIR [--split=NAME] [--data_path=FILE]

`--data_path` evaluates any file in the task's format instead of a named split (a TSV, a CoNLL
file, or 'SOURCE,TARGET' line-aligned text files). Writes `DIR/eval/NAME/metrics.json` (NAME: the
split, or the file's name) and, for tasks that predict (classification, tagging, translation,
retrieval), `DIR/eval/NAME/predictions.jsonl` with one row per example; prints the metrics.
"""

import json
import os
import re

import jax
from absl import app, flags
from absl import logging as absl_logging

from jaxlm import config as config_lib
from jaxlm.parallel import distributed
from jaxlm.tasks import base
from jaxlm.train import loop
from jaxlm.train import workdir as workdir_lib

FLAGS = flags.FLAGS


def evaluate(workdir: str, split: str | None = None, eval_batches: int = 0, data_path: str = "") -> dict:
    """Metrics of the latest checkpoint in `workdir` on `split` (or the file `data_path`); also
    written, with the per-example predictions where the task makes them, to the workdir."""
    config = config_lib.load(workdir)
    config.data.eval_split = split or config.data.eval_split
    config.train.eval_batches = eval_batches
    run, params, step = loop.restore_latest(workdir, config)
    name = re.sub(r"[^\w.-]", "_", os.path.basename(data_path.split(",")[0])) if data_path else config.data.eval_split
    rows = None
    if isinstance(run.task.serving_task, base.Predicts):
        figures, rows = run.task.serving_task.predictions(params, config.data.eval_split, data_path)
    elif data_path:
        raise ValueError(f"task {config.task.name!r} evaluates named splits only, not --data_path")
    else:
        figures = loop.Evaluator(run, config)(params)
    metrics = {"step": step, **figures}
    if jax.process_index() == 0:  # every process computed the same figures
        out = os.path.join(workdir, "eval", name)
        with workdir_lib.lock(out):  # two evaluations of one split do not interleave their files
            _write(os.path.join(out, "metrics.json"), json.dumps(metrics, indent=2))
            if rows is not None:
                _write(os.path.join(out, "predictions.jsonl"), "".join(json.dumps(row) + "\n" for row in rows))
    return metrics


def _write(path: str, text: str) -> None:
    """Replaces `path` whole (a reader never sees half a file)."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)
    distributed.initialize()  # from the environment: the training run's coordinator is gone
    metrics = evaluate(FLAGS.workdir, FLAGS.split, FLAGS.eval_batches, FLAGS.data_path)
    if jax.process_index() == 0:
        print(json.dumps(metrics))


def run():
    """The `jaxlm-eval` command; its flags are defined only when run (tests and tools import
    the functions above)."""
    flags.DEFINE_string("workdir", None, "A jaxlm run directory.")
    flags.DEFINE_string("split", None, "The split to evaluate (default: the run's data.eval_split).")
    flags.DEFINE_string("data_path", "", "A file in the task's format to evaluate instead of a split.")
    flags.DEFINE_integer("eval_batches", 0, "Batches to evaluate (0: the whole split).")
    flags.mark_flags_as_required(["workdir"])
    app.run(main)


if __name__ == "__main__":
    run()
