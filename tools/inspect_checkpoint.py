r"""Every parameter of a run's checkpoint: shape, dtype, logical axes, sharding, bytes, norm.

    python tools/inspect_checkpoint.py RUN [--filter=REGEX] [--json=PATH]

Prints the run's latest step (that restores) and what it is (task, model, mesh), then one row per parameter:
  path | shape | dtype | logical axes | sharding on the run's mesh | bytes | per device | L2 norm
and the totals (parameters, bytes, trainable and frozen, the largest per-device share). The
sharding is what the run's logical-axis rules give on its own mesh (`config.mesh`, devices of
this machine not needed); the values are restored on this machine's devices. A PEFT run's frozen
parameters come from its base (`init_from`), as in any restore.
"""

import json
import math
import os
import re
import sys

import flax
import flax.linen as nn
import jax
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxlm import config as config_lib  # noqa: E402
from jaxlm.train import loop  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("filter", "", "Only parameters whose path matches this regex (totals stay whole).")
flags.DEFINE_string("json", None, "Also write the rows and totals here.")


def mesh_sizes(config) -> dict:
    """{mesh axis: size} of the run's mesh; -1 (all devices) stays -1 (unknown here)."""
    return {axis: config.mesh[axis] for axis in ("data", "fsdp", "tensor", "stage")}


def rows_of(run, params: dict, sizes: dict) -> list[dict]:
    with run.partitioner.context():
        boxed = jax.eval_shape(lambda: run.task.init(jax.random.key(0))["params"])
    axes = {"/".join(k): v.names for k, v in flax.traverse_util.flatten_dict(
        boxed, is_leaf=lambda _, x: isinstance(x, nn.LogicallyPartitioned)).items()
            if isinstance(v, nn.LogicallyPartitioned)}
    trainable = {"/".join(k) for k in flax.traverse_util.flatten_dict(run.abstract_state.params)}
    rows = []
    for key, value in flax.traverse_util.flatten_dict(jax.device_get(params)).items():
        path, value = "/".join(key), np.asarray(value)
        names = axes.get(path, (None,) * value.ndim)
        spec = nn.logical_to_mesh_axes(names, run.partitioner.rules)
        split = 1
        for part in spec:
            for axis in ((part,) if isinstance(part, str) else part or ()):
                split *= max(sizes.get(axis, 1), 1)
        rows.append({"path": path, "shape": list(value.shape), "dtype": str(value.dtype),
                     "axes": list(names), "sharding": str(tuple(spec)), "bytes": int(value.nbytes),
                     "per_device_bytes": int(math.ceil(value.nbytes / split)),
                     "norm": float(np.linalg.norm(value.astype(np.float64).ravel())),
                     "trainable": path in trainable})
    return rows


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def inspect(workdir: str, pattern: str = "") -> dict:
    config = config_lib.load(workdir)
    sizes = mesh_sizes(config)
    run, params, step = loop.restore_latest(workdir)
    rows = rows_of(run, params, sizes)
    shown = [r for r in rows if re.search(pattern, r["path"])] if pattern else rows
    m = config.model
    totals = {"parameters": sum(math.prod(r["shape"]) for r in rows), "bytes": sum(r["bytes"] for r in rows),
              "trainable": sum(math.prod(r["shape"]) for r in rows if r["trainable"]),
              "per_device_bytes": sum(r["per_device_bytes"] for r in rows)}
    return {"workdir": workdir, "step": int(step), "task": config.task.name, "model": m.name,
            "shape": {k: m[k] for k in ("num_layers", "emb_dim", "num_heads", "num_kv_heads", "mlp_dim", "vocab_size")},
            "peft": config.peft.method, "mesh": sizes, "rows": shown, "totals": totals}


def main(argv):
    if len(argv) != 2:
        raise app.UsageError("name one run folder: python tools/inspect_checkpoint.py RUN")
    report = inspect(argv[1], FLAGS.filter)
    print(f"{report['workdir']}: step {report['step']}, task {report['task']}, model {report['model']} "
          f"{report['shape']}, peft {report['peft']}, mesh {report['mesh']}")
    width = max([len(r["path"]) for r in report["rows"]] + [9])
    print(f"{'parameter':<{width}}  {'shape':<18} {'dtype':<8} {'logical axes':<40} {'sharding':<34} "
          f"{'bytes':>9} {'per dev':>9} {'norm':>10}")
    for r in report["rows"]:
        print(f"{r['path']:<{width}}  {str(tuple(r['shape'])):<18} {r['dtype']:<8} {str(tuple(r['axes'])):<40} "
              f"{r['sharding']:<34} {_size(r['bytes']):>9} {_size(r['per_device_bytes']):>9} {r['norm']:>10.4g}")
    t = report["totals"]
    print(f"total: {t['parameters']:,} parameters ({t['trainable']:,} trainable, "
          f"{t['parameters'] - t['trainable']:,} frozen), {_size(t['bytes'])}; "
          f"{_size(t['per_device_bytes'])} per device on the run's mesh")
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    app.run(main)
