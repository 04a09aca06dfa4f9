r"""Trains one config on several meshes and prints how far each run is from the 1-device run.

    python tools/compare_meshes.py --config=configs/gpt_shakespeare_char.py --cpu_devices=8 \
        --steps=10 --meshes="data=8;data=2,fsdp=2,tensor=2;fsdp=4,tensor=2" \
        --config.model.vocab_multiple=8

For each mesh: the loss at every step and the largest relative difference from the 1-device
losses and final parameters. Sharding is config, so these should agree to float rounding.
"""

import json
import os
import sys
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
flags.DEFINE_string("meshes", "data=8", "Meshes separated by ';', axes as 'data=2,fsdp=4'.")
flags.DEFINE_integer("steps", 10, "Train steps per run.")
flags.DEFINE_integer("cpu_devices", 0, "Split the host CPU into this many devices (0: as is).")
flags.mark_flags_as_required(["config"])


def parse_mesh(text: str) -> dict:
    sizes = dict(data=1, fsdp=1, tensor=1, stage=1, num_devices=0)
    for item in filter(None, text.split(",")):
        axis, size = item.split("=")
        if axis not in sizes:
            raise ValueError(f"unknown mesh axis {axis!r} in {text!r}")
        sizes[axis] = int(size)
    return sizes


def train(config, mesh: dict, steps: int):
    from jaxlm.train import loop
    config = config.copy_and_resolve_references()
    config.mesh.update(mesh)
    config.train.update(dict(steps=steps, log_every=1, eval_every=10 ** 9))
    config.checkpoint.every = 10 ** 9
    config.sample.max_new_tokens = 0
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        state = loop.train_and_evaluate(config, workdir)
        seconds = time.perf_counter() - start
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            losses = [json.loads(line)["train/loss"] for line in f if "train/loss" in line]
    return np.array(losses), jax.device_get(state.params), seconds


def max_relative(a, b, floor: float = 1e-12) -> float:
    """max |a - b| / max(|b|, floor): `floor` keeps near-zero entries from dominating."""
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), floor)))


def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)
    if FLAGS.cpu_devices:
        jax.config.update("jax_num_cpu_devices", FLAGS.cpu_devices)
    print("command:", " ".join([os.path.basename(sys.executable)] + sys.argv))
    config = FLAGS.config
    reference, ref_params, seconds = train(config, dict(num_devices=1), FLAGS.steps)
    print(f"{'mesh':32s} {'loss@' + str(FLAGS.steps):>10s} {'max rel loss diff':>18s} "
          f"{'max rel param diff':>19s} {'run s':>7s}")
    print(f"{'1 device':32s} {reference[-1]:10.6f} {0:18.2e} {0:19.2e} {seconds:7.1f}")
    for text in FLAGS.meshes.split(";"):
        losses, params, seconds = train(config, parse_mesh(text), FLAGS.steps)
        param_diff = max(max_relative(a, b, floor=1e-3) for a, b in
                         zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)))
        print(f"{text:32s} {losses[-1]:10.6f} {max_relative(losses, reference):18.2e} "
              f"{param_diff:19.2e} {seconds:7.1f}")


if __name__ == "__main__":
    app.run(main)
