"""Averages the parameters of a run's last checkpoints (Vaswani et al. 2017 average the last 5 or
20 of their translation models): one workdir whose single checkpoint holds the mean.

    python tools/average_checkpoints.py --workdir=runs/t5_multi30k --last=3 --output=runs/t5_avg
    python -m jaxlm.evaluate --workdir=runs/t5_avg        # eval/bleu of the averaged model

The output (`jaxlm.train.loop.export_workdir`) holds the run's config and tokenizer and one
checkpoint at the newest averaged step; it evaluates, predicts and serves as `init_from`, it does
not resume training. The checkpoints kept (`checkpoint.keep`, `checkpoint.every`) are the ones
there are to average. A run with stored quantized weights is refused: codes do not average.
"""

import jax
import numpy as np
from absl import app, flags

from jaxlm import config as config_lib
from jaxlm.compress import quantize
from jaxlm.train import checkpoint, loop


def average_workdir(workdir: str, output: str, last: int) -> list[int]:
    """Writes `output` with the mean parameters of `workdir`'s `last` newest checkpoints; returns
    their steps."""
    if last < 1:
        raise ValueError(f"--last={last}: average at least one checkpoint")
    config = config_lib.load(workdir)
    if quantize.from_config(config.model).stored:
        raise ValueError(f"{workdir} stores quantized weights (model.quant): average a float run")
    steps = checkpoint.saved_steps(workdir)[-last:]
    if len(steps) < last:
        raise ValueError(f"{workdir} keeps {len(steps)} checkpoints {steps}, fewer than --last={last}")
    run, _, _ = loop.restore_latest(workdir)
    total = None
    for step in steps:
        params, _ = checkpoint.restore_params(workdir, run.abstract_state.params, step=step)
        params = jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(params))
        total = params if total is None else jax.tree.map(np.add, total, params)
    mean = jax.tree.map(lambda x: x / len(steps), total)
    loop.export_workdir(config, workdir, output, lambda _: mean, steps[-1])
    return steps


def main(argv):
    del argv
    args = flags.FLAGS
    steps = average_workdir(args.workdir, args.output, args.last)
    print(f"averaged steps {steps} of {args.workdir} into {args.output}")


if __name__ == "__main__":  # flags defined here only: tests import this module beside other tools
    flags.DEFINE_string("workdir", None, "a finished or running run")
    flags.DEFINE_integer("last", 3, "how many of the newest checkpoints to average")
    flags.DEFINE_string("output", None, "a new folder for the averaged run")
    flags.mark_flags_as_required(["workdir", "output"])
    app.run(main)
