r"""Runs one config on several meshes: step time, loss, memory and compile time next to the
1-device run, and how far each mesh's losses are from it.

    python tools/compare_meshes.py --config=configs/gpt_shakespeare_char.py --cpu_devices=8 \
        --steps=20 --meshes="data=8;fsdp=8;data=4,tensor=2;stage=2,data=4;stage=4,data=2" \
        --config.model.vocab_multiple=8 --config.model.scan_layers=True

Each mesh is a list of `axis=size` (mesh axes, `pipeline.KEY=value`, `sequence_parallel=1`)
separated by ','; meshes are separated by ';'. Each run is `tools/benchmark.py`'s: the trainer's
jitted call, timed after compiling; the loss is the train loss of the Nth step (the same
batches on every mesh). Sharding is config, so the losses should agree to float rounding.
"""

import os
import sys
import tempfile

import jax
import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxlm.train import measure  # noqa: E402 (after the checkout is on the path)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
flags.DEFINE_string("meshes", "data=8", "Meshes separated by ';', axes as 'data=2,fsdp=4'.")
flags.DEFINE_integer("steps", 20, "Train steps per run (steps_per_call is set to 1).")
flags.DEFINE_integer("cpu_devices", 0, "Split the host CPU into this many devices (0: as is).")
flags.mark_flags_as_required(["config"])

MB = 2 ** 20


def parse_layout(text: str) -> dict:
    """'stage=2,data=4,pipeline.microbatches=8' -> {'mesh': {...}, 'pipeline': {...}}."""
    layout = {"mesh": dict(data=1, fsdp=1, tensor=1, stage=1, num_devices=0), "pipeline": {}}
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        section, _, name = key.rpartition(".")
        section = section or "mesh"
        if section not in layout or (section == "mesh" and name not in layout["mesh"]
                                     and name != "sequence_parallel"):
            raise ValueError(f"unknown mesh axis or key {key!r} in {text!r}")
        layout[section][name] = (value if name == "schedule" else bool(int(value))
                                 if name == "sequence_parallel" else int(value))
    return layout


def run(config, layout: dict, steps: int) -> dict:
    config = config.copy_and_resolve_references()
    config.mesh.update(layout["mesh"])
    config.pipeline.update(layout["pipeline"])
    config.train.steps_per_call = 1
    with tempfile.TemporaryDirectory() as workdir:
        return measure.train_step(config, workdir, steps=steps, warmup=0)


def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)
    if FLAGS.cpu_devices:
        jax.config.update("jax_num_cpu_devices", FLAGS.cpu_devices)
    print("command:", " ".join([os.path.basename(sys.executable)] + sys.argv))
    single = {"mesh": dict(num_devices=1), "pipeline": {}}
    runs = [("1 device", single)] + [(text, parse_layout(text)) for text in FLAGS.meshes.split(";")]
    reference = None
    print(f"{'mesh':40s} {'loss@' + str(FLAGS.steps):>9s} {'max rel diff':>12s} {'ms/step':>8s} "
          f"{'compile s':>9s} {'peak MiB':>9s} {'estimate MiB':>12s}")
    for text, layout in runs:
        f = run(FLAGS.config, layout, FLAGS.steps)
        losses = np.array(f["losses"])
        reference = losses if reference is None else reference
        diff = float(np.max(np.abs(losses - reference) / np.abs(reference)))
        print(f"{text:40s} {losses[-1]:9.5f} {diff:12.2e} {f['ms_per_step']:8.1f} "
              f"{f['compile_s']:9.2f} {f['peak_mem_bytes'] / MB:9.2f} {f['est_total_bytes'] / MB:12.2f}",
              flush=True)


if __name__ == "__main__":
    app.run(main)
