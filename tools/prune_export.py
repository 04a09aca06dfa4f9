"""Cuts the pruned heads and neurons out of a `prune.method='heads'` run: a smaller plain model.

    python -m jaxlm.main --config=configs/sst2.py --workdir=runs/sst2_heads \\
        --config.init_from=runs/sst2 --config.prune.method=heads \\
        --config.prune.heads_pruned=0.5 --config.prune.mlp_pruned=0.5
    python tools/prune_export.py --workdir=runs/sst2_heads --output=runs/sst2_heads_small
    python -m jaxlm.evaluate --workdir=runs/sst2_heads_small     # same predictions, fewer FLOPs

The output's config has the kept `model.num_heads` (with `model.head_dim` explicit, as before)
and `model.mlp_dim`, `prune.method='none'`, `peft.method='full'` and no init_from; its one
checkpoint (at the run's step) holds the sliced kernels and biases. It loads like any run
(`jaxlm.evaluate`, `jaxlm.predict`, `init_from`).
"""


from absl import app, flags
import jax

from jaxlm import config as config_lib
from jaxlm.compress import prune
from jaxlm.train import checkpoint, loop


def export(workdir: str, output: str) -> int:
    """Writes the smaller copy of `workdir`'s latest checkpoint to `output`; returns its step."""
    run, params, step = loop.restore_latest(workdir)
    if run.config.prune.method != "heads":
        raise ValueError(f"{workdir} is a prune.method={run.config.prune.method!r} run: only "
                         "prune.method='heads' removes whole heads and neurons")
    axes, _ = prune.masked_axes(run.config, run.task, run.partitioner)
    smaller, sizes = prune.smaller_params(axes, jax.device_get(params),
                                          jax.device_get(restore_masks(run, workdir, step)))
    config = config_lib.load(workdir)
    m = config.model
    m.update(dict(head_dim=m.head_dim or m.emb_dim // m.num_heads, mlp_dim=m.mlp_dim or 4 * m.emb_dim))
    m.update(sizes)
    config.prune.method = "none"
    config.peft.update(dict(method="full", frozen="", trainable=""))
    config.init_from = ""
    loop.export_workdir(config, workdir, output, lambda abstract: smaller, step)
    return step


def restore_masks(run, workdir: str, step: int) -> dict:
    ckpt = checkpoint.Checkpointer(workdir, read_only=True)
    try:
        return prune.masks(ckpt.restore(run.abstract_state, step=step).opt_state)
    finally:
        ckpt.close()


def main(argv):
    del argv
    args = flags.FLAGS
    step = export(args.workdir, args.output)
    print(f"exported step {step} of {args.workdir} into {args.output}")


if __name__ == "__main__":  # flags defined here only: tests import this module beside other tools
    flags.DEFINE_string("workdir", None, "a prune.method='heads' run")
    flags.DEFINE_string("output", None, "a new folder for the smaller model")
    flags.mark_flags_as_required(["workdir", "output"])
    app.run(main)
