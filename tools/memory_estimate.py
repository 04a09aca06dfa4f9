r"""Memory per device of a run on meshes larger than this machine, from abstract shapes only.

    python tools/memory_estimate.py --config=configs/llama3.py:8b --cpu_devices=256 \
        --meshes="fsdp=8;fsdp=64,tensor=4" --remat=none,full

For each mesh and `model.remat`: `jaxlm.train.memory.estimate` of the run that config builds
(parameters, optimizer state and gradients exactly from their shardings; activations from the
model of `memory.py`), with one sequence of `data.seq_len` per batch shard
(`--rows_per_shard`). Nothing is allocated or compiled: the host's CPU is split into
`--cpu_devices` devices only so that the meshes can be described. Beside it, the ZeRO paper's 16
bytes per parameter (mixed-precision Adam, Rajbhandari et al. 2020) over the data shards, and the
activations of Korthikanti et al. 2022 (Megatron; per layer and token 34 h + 5 a s bytes without
recomputation, 2 h with full recomputation, both with tensor parallelism t dividing all but 10 h).
"""

import os
import sys
import tempfile

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxlm.train import loop, memory  # noqa: E402 (after the checkout is on the path)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
flags.DEFINE_string("meshes", "fsdp=8", "Meshes separated by ';', axes as 'fsdp=64,tensor=4'.")
flags.DEFINE_string("remat", "none,full", "model.remat policies, separated by ','.")
flags.DEFINE_integer("rows_per_shard", 1, "Sequences per batch shard (data x fsdp).")
flags.DEFINE_integer("cpu_devices", 0, "Split the host CPU into this many devices (0: as is).")
flags.mark_flags_as_required(["config"])

GIB = 2 ** 30


def parse_mesh(text: str) -> dict:
    mesh = dict(data=1, fsdp=1, tensor=1, stage=1)
    for item in filter(None, text.split(",")):
        axis, _, size = item.partition("=")
        if axis not in mesh:
            raise ValueError(f"unknown mesh axis {axis!r} in {text!r}: expected {sorted(mesh)}")
        mesh[axis] = int(size)
    return mesh


def estimate(config, mesh: dict, remat: str, rows_per_shard: int) -> dict:
    config = config.copy_and_resolve_references()
    config.mesh.update(dict(mesh, num_devices=mesh["data"] * mesh["fsdp"] * mesh["tensor"] * mesh["stage"]))
    config.model.remat = remat
    config.train.batch_size = rows_per_shard * mesh["data"] * mesh["fsdp"]
    with tempfile.TemporaryDirectory() as workdir:
        return memory.estimate(loop.setup(config, workdir))


def published(config, mesh: dict, remat: str, rows_per_shard: int, params: int) -> float:
    """Bytes per device by the ZeRO-3 and Megatron activation formulas (see the docstring)."""
    m, s = config.model, config.data.seq_len
    shards = mesh["data"] * mesh["fsdp"] * mesh["tensor"]
    h, a, t = m.emb_dim, m.num_heads, mesh["tensor"]
    per_token = 2 * h if remat == "full" else 10 * h + (24 * h + 5 * a * s) / t
    return 16 * params / shards + m.num_layers * rows_per_shard * s * per_token


def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)
    if FLAGS.cpu_devices:
        jax.config.update("jax_num_cpu_devices", FLAGS.cpu_devices)
    print("command:", " ".join([os.path.basename(sys.executable)] + sys.argv))
    print(f"{'mesh':22s} {'remat':5s} {'params':>8s} {'optim':>8s} {'grads':>8s} {'activ':>8s} "
          f"{'total GiB':>9s} {'published':>9s}")
    for text in FLAGS.meshes.split(";"):
        mesh = parse_mesh(text)
        for remat in FLAGS.remat.split(","):
            f = estimate(FLAGS.config, mesh, remat, FLAGS.rows_per_shard)
            shards = mesh["data"] * mesh["fsdp"] * mesh["tensor"]
            params = f["params"] * shards // 4  # float32 parameters, fully sharded
            g = {k: (v or 0) / GIB for k, v in f.items()}
            ref = published(FLAGS.config, mesh, remat, FLAGS.rows_per_shard, params) / GIB
            print(f"{text:22s} {remat:5s} {g['params']:8.2f} {g['optimizer']:8.2f} {g['gradients']:8.2f} "
                  f"{g['activations']:8.2f} {g['total']:9.2f} {ref:9.2f}", flush=True)


if __name__ == "__main__":
    app.run(main)
