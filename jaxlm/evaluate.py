"""Evaluates the latest checkpoint of a run: `python -m jaxlm.evaluate --workdir=DIR`.

Writes `DIR/eval/SPLIT/metrics.json` and prints the metrics as JSON on stdout.
"""

import json
import os

import jax
from absl import app, flags
from absl import logging as absl_logging

from jaxlm import config as config_lib
from jaxlm.parallel import distributed
from jaxlm.train import loop

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A jaxlm run directory.")
flags.DEFINE_string("split", None, "The split to evaluate (default: the run's data.eval_split).")
flags.DEFINE_integer("eval_batches", 0, "Batches to evaluate (0: the whole split).")
flags.mark_flags_as_required(["workdir"])


def evaluate(workdir: str, split: str | None = None, eval_batches: int = 0) -> dict:
    """Metrics of the latest checkpoint in `workdir` on `split`; also written to the workdir."""
    config = config_lib.load(workdir)
    config.data.eval_split = split or config.data.eval_split
    config.train.eval_batches = eval_batches
    run, params, step = loop.restore_latest(workdir, config)
    metrics = {"step": step, **loop.Evaluator(run, config)(params)}
    if jax.process_index() == 0:  # every process computed the same figures
        out = os.path.join(workdir, "eval", config.data.eval_split)
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
    return metrics


def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)
    distributed.initialize()  # from the environment: the training run's coordinator is gone
    metrics = evaluate(FLAGS.workdir, FLAGS.split, FLAGS.eval_batches)
    if jax.process_index() == 0:
        print(json.dumps(metrics))


if __name__ == "__main__":
    app.run(main)
