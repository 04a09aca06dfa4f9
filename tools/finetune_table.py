"""Fine-tunes one config with several PEFT methods and prints a table of what each costs and gains.

    python tools/finetune_table.py --config=configs/sst2.py --methods=full,lora,adapter,prompt,bitfit,head \
        --steps=800 --workdir=/tmp/sst2_methods

Each method runs `python -m jaxlm.main --config=CONFIG:METHOD` (the config file's argument picks
the method and its learning rate) for `--steps` steps in `WORKDIR/METHOD`, then
`python -m jaxlm.evaluate` on the whole eval split. The table gives the trainable parameters
(from `params.json`), the eval metric, the median training ms/step (from the logged examples/s,
compile excluded) and the wall time one epoch of the train split would take at that speed.
A method whose workdir already holds a finished run is not trained again.
"""

import json
import os
import subprocess
import sys

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from jaxlm import config as config_lib
from jaxlm.data import labeled
from jaxlm.train import metrics as metrics_lib


def run(cmd: list[str]) -> str:
    print("+", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stderr[-5000:])
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}")
    return done.stdout


def train_examples(config) -> int:
    d = config.data
    if config.task.name == "classification":
        return len(labeled.classification_source(d.name, d.train_split, data_dir=d.data_dir, files=d.files)[0])
    return len(labeled.tagging_source(d.name, d.train_split, data_dir=d.data_dir, files=d.files)[0])


FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/sst2.py", "The config file (its argument picks the method: "
                                "leave it off); --config.a.b=v overrides go to every run.")
flags.DEFINE_list("methods", ["full", "lora", "adapter", "prompt", "bitfit", "head"], "PEFT methods, one run each.")
flags.DEFINE_integer("steps", 800, "Training steps of each run.")
flags.DEFINE_string("workdir", None, "A folder for the runs (one subfolder per method).")
flags.DEFINE_string("metric", "accuracy", "The key of jaxlm.evaluate's metrics for the table.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    args = FLAGS
    config_file = config_flags.get_config_filename(FLAGS["config"]).split(":")[0]
    overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]  # checked by the config flag
    rows = []
    for method in args.methods:
        workdir = os.path.join(args.workdir, method)
        run_flags = [f"--config={config_file}:{method}", f"--workdir={workdir}",
                     f"--config.train.steps={args.steps}", f"--config.train.eval_every={args.steps}",
                     "--config.train.eval_batches=4", *overrides]
        run([sys.executable, "-m", "jaxlm.main", *run_flags])
        metrics = json.loads(run([sys.executable, "-m", "jaxlm.evaluate", f"--workdir={workdir}"]).strip().splitlines()[-1])
        params = json.load(open(os.path.join(workdir, "params.json")))
        config = config_lib.load(workdir)
        speeds = [v for _, v in sorted(metrics_lib.read_curves(workdir)["train/examples_per_sec"].items())][1:]
        ms = 1e3 * config.train.batch_size / float(np.median(speeds))
        epoch_min = train_examples(config) / config.train.batch_size * ms / 6e4
        rows.append((method, params["trainable"], 100 * params["trainable"] / params["total"],
                     metrics[args.metric], ms, epoch_min))
        print(f"{method}: {rows[-1]}", flush=True)
    print(f"\n{args.steps} steps of batch {config.train.batch_size} each; eval on the whole "
          f"{config.data.eval_split} split\n")
    print(f"| method | trainable params | % of total | {args.metric} | ms/step | min/epoch |")
    print("|---|---|---|---|---|---|")
    for method, trainable, share, metric, ms, epoch_min in rows:
        print(f"| {method} | {trainable:,} | {share:.2f}% | {metric:.4f} | {ms:.0f} | {epoch_min:.1f} |")


if __name__ == "__main__":
    app.run(main)
