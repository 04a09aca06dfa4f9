r"""Measures a config's train step: compile time, ms/step, tokens/s, MFU and memory per device.

    python tools/benchmark.py --config=configs/gpt_shakespeare_char.py --steps=20 --warmup=3 \
        [--config.a.b=v ...] [--workdir=DIR] [--json=PATH]

The run is built the way the trainer builds it: `loop.setup`, `state.init`, the same jitted
`repeat_steps(train_step)` with the state's shardings and donation, and real batches from
the task's `train_iterator`. Each call runs `train.steps_per_call` steps; figures are per step.
Only the train call is timed (fetching and sharding the next batches is timed apart, as
`data_ms_per_step`). Before compiling it prints the memory estimate per device
(`jaxlm.train.memory`); the measured peak per device is XLA's (arguments + outputs + temp -
aliased, from the compiled call's `memory_analysis()`) and, where the backend keeps them (not
CPU), the device's own peak bytes in use. The MFU denominator is `train.peak_flops` when set, else a matmul measured
on the mesh's first device, times the mesh's device count. The last line printed is
`key=value` figures for scripts; `--json` writes every figure.
"""

import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

# The checkout's jaxlm, also when it is not pip-installed (`python tools/benchmark.py ...`).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxlm.train import measure

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
flags.DEFINE_integer("steps", 20, "Timed calls (each runs train.steps_per_call steps).")
flags.DEFINE_integer("warmup", 3, "Untimed calls before the timed ones.")
flags.DEFINE_string("workdir", None, "Where the tokenizer is saved (default: a temporary dir).")
flags.DEFINE_string("json", None, "Also write the figures as JSON to this path.")
flags.mark_flags_as_required(["config"])

MB = 2 ** 20


def provenance() -> dict:
    """What it takes to rerun the figures: the command, the XLA/JAX environment, the commit."""
    command = "python " + shlex.join(sys.argv)
    env = {k: os.environ[k] for k in ("XLA_FLAGS", "JAX_PLATFORMS", "JAX_NUM_CPU_DEVICES") if k in os.environ}
    if env:
        command = shlex.join(f"{k}={v}" for k, v in env.items()) + " " + command
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], check=True,
                                capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                               check=True, capture_output=True, text=True).stdout.strip()
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return dict(command=command, commit=commit, jax_version=jax.__version__)


def report(figures: dict) -> str:
    """The figures as lines for people, then one `key=value` line for scripts."""
    f = figures
    mb = lambda b: "n/a" if b is None else f"{b / MB:.1f} MB"
    peak_source = "measured f32 matmul" if f["peak_flops_measured"] else "train.peak_flops"
    lines = [
        f"command: {f['command']}",
        f"commit: {f['commit']}  jax: {f['jax_version']}",
        f"devices: {f['num_devices']} x {f['device_kind']}  mesh: {f['mesh']}",
        f"parameters: {f['params']:,}  batch: {f['batch_size']} x {f['seq_len']} = "
        f"{f['tokens_per_step']:,} tokens/step  steps/call: {f['steps_per_call']}",
        f"compile: {f['compile_s']:.2f} s (lower {f['lower_s']:.2f} s)",
        f"step: {f['ms_per_step']:.2f} ms median, p10 {f['ms_per_step_p10']:.2f}, "
        f"p90 {f['ms_per_step_p90']:.2f} ({f['steps']} calls after {f['warmup']} warm-up); "
        f"next batches {f['data_ms_per_step']:.2f} ms/step",
        f"throughput: {f['tokens_per_sec']:,.0f} tokens/s, {f['flops_per_step'] / 1e9:.3f} GFLOP/step, "
        f"{f['flops_per_sec'] / 1e9:.2f} GFLOP/s",
        f"MFU: {100 * f['mfu']:.2f}% of {f['num_devices']} x {f['peak_flops_per_device'] / 1e9:.1f} "
        f"GFLOP/s ({peak_source})",
        f"memory/device: compiled peak {mb(f['peak_mem_bytes'])} (arguments "
        f"{mb(f['compiled_argument_bytes'])} + outputs {mb(f['compiled_output_bytes'])} + temp "
        f"{mb(f['compiled_temp_bytes'])} - aliased {mb(f['compiled_alias_bytes'])}); "
        f"device peak {mb(f['device_peak_mem_bytes'])}",
        f"estimate/device: params {mb(f['est_params_bytes'])} + optimizer {mb(f['est_optimizer_bytes'])}"
        f" + gradients {mb(f['est_gradients_bytes'])} + activations {mb(f['est_activations_bytes'])}"
        f" = {mb(f['est_total_bytes'])}",
        f"loss: {f['loss_first']:.4f} -> {f['loss_last']:.4f}",
    ]
    device_peak = f["device_peak_mem_bytes"]
    summary = dict(
        ms_per_step=f"{f['ms_per_step']:.3f}",
        ms_per_step_p10=f"{f['ms_per_step_p10']:.3f}",
        ms_per_step_p90=f"{f['ms_per_step_p90']:.3f}",
        tokens_per_sec=f"{f['tokens_per_sec']:.1f}",
        flops_per_step=f"{f['flops_per_step']:.6g}",
        mfu=f"{f['mfu']:.5f}",
        compile_s=f"{f['compile_s']:.3f}",
        peak_mb=f"{f['peak_mem_bytes'] / MB:.3f}",
        device_peak_mb="nan" if device_peak is None else f"{device_peak / MB:.3f}",
        estimate_mb=f"{f['est_total_bytes'] / MB:.3f}",
        params=str(f["params"]),
        devices=str(f["num_devices"]),
    )
    lines.append(" ".join(f"{k}={v}" for k, v in summary.items()))
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax and Grain are chatty at INFO
    logging.getLogger("jaxlm").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="jaxlm_benchmark_") as tmp:
        figures = measure.train_step(FLAGS.config, FLAGS.workdir or tmp, steps=FLAGS.steps, warmup=FLAGS.warmup)
    figures = {**provenance(), **figures}
    if jax.process_index() == 0:
        print(report(figures), flush=True)
        if FLAGS.json:
            with open(FLAGS.json, "w") as f:
                json.dump(figures, f, indent=2, sort_keys=True)


if __name__ == "__main__":
    app.run(main)
