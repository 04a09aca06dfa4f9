"""Compresses one trained run several ways and measures each result next to the original.

    python tools/compress_report.py --baseline=runs/sst2 --config=configs/sst2.py \\
        --output=runs/sst2_compress --methods=float,int8,w8a8,int4,qat_int8,magnitude:0.5,magnitude:0.8,nm,heads:0.5,distill,alone \\
        --steps=300 --distill_steps=800

Methods (each leaves a served workdir `OUTPUT/NAME/served`: parameters only, as deployed):
  float            the baseline's parameters as they are (the reference row)
  int8 w8a8 int4 nf4   post-training quantization (tools/quantize.py)
  qat_int8         `--steps` of quantization-aware fine-tuning from the baseline, then int8
  magnitude:S      gradual magnitude pruning to sparsity S over the first 60% of `--steps`
  nm               2:4 sparsity from the first step, then `--steps` of fine-tuning
  heads:F          a share F of the attention heads and MLP neurons removed by importance, then
                   `--steps` of fine-tuning, exported physically smaller (tools/prune_export.py)
  distill / alone  the student of `--distill_config` trained `--distill_steps` with / without the
                   baseline as its teacher
Training methods run `python -m jaxlm.main --config=CONFIG` (the baseline's config file) with
`init_from` the baseline (its architecture and parameters) and `--lr` (linear decay, no warm-up). Every result is evaluated on the whole eval split
(`jaxlm.evaluate`); its size is the bytes of its checkpoint; ms/batch is one jitted eval batch of
the baseline's batch size, timed for all results in this process in interleaved rounds (medians).
Writes OUTPUT/report.md, report.json and report.png (the metric against size and latency).
"""

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
from absl import flags

from jaxlm import config as config_lib
from jaxlm import evaluate as evaluate_lib
from jaxlm import tree
from jaxlm.tasks import distillation
from jaxlm.train import loop, step as step_lib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import prune_export  # noqa: E402
import quantize as quantize_tool  # noqa: E402

QUANTIZED = {"int8": dict(weights="int8"), "w8a8": dict(weights="int8", activations="int8"),
             "int4": dict(weights="int4"), "nf4": dict(weights="nf4")}


def train(args, name: str, *flags: str, config: str | None = None) -> str:
    """Runs `python -m jaxlm.main` from the baseline with `flags`; returns its workdir."""
    workdir = os.path.join(args.output, name, "run")
    steps = args.distill_steps if config else args.steps
    command = [sys.executable, "-m", "jaxlm.main", f"--workdir={workdir}", f"--config={config or args.config}",
               f"--config.train.steps={steps}", f"--config.train.eval_every={steps}",
               f"--config.checkpoint.every={steps}", "--config.sample.max_new_tokens=0"]
    if config is None:
        command += [f"--config.init_from={args.baseline}", f"--config.optim.lr={args.lr}",
                    "--config.optim.warmup_steps=0", "--config.optim.schedule=linear", "--config.optim.end_lr=0"]
    else:
        command += [f"--config.distill.teacher={args.baseline}"]
    log_path = os.path.join(args.output, name, "train.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    print(" ".join(command), flush=True)
    with open(log_path, "w") as log:
        if subprocess.run(command + list(flags), stdout=log, stderr=subprocess.STDOUT).returncode:
            raise RuntimeError(f"{name}: training failed, see {log_path}")
    return workdir


def served_copy(workdir: str, output: str) -> str:
    """A parameters-only copy of `workdir`'s latest checkpoint (what a server loads); of a
    distillation run, the student alone as a plain run of its task."""
    _, params, step = loop.restore_latest(workdir)
    params = jax.device_get(params)
    config = config_lib.load(workdir)
    if config.task.name == "distillation":
        config.task.name, config.distill.teacher = config.distill.student_task, ""
        params = {k: v for k, v in params.items() if k not in (distillation.TEACHER, distillation.PROJECTION)}
    loop.export_workdir(config, workdir, output, lambda _: params, step)
    return output


def compress(args, method: str) -> str:
    """Runs one method; returns the served workdir."""
    name = method.replace(":", "_")
    served = os.path.join(args.output, name, "served")
    if os.path.isdir(served):  # done in an earlier invocation
        return served
    kind, _, value = method.partition(":")
    if kind == "float":
        return served_copy(args.baseline, served)
    if kind in QUANTIZED:
        quantize_tool.quantize_workdir(args.baseline, served, **QUANTIZED[kind])
        return served
    if kind == "qat_int8":
        run = train(args, name, "--config.model.quant.weights=int8", "--config.model.quant.qat=True")
        quantize_tool.quantize_workdir(run, served)
        return served
    if kind == "magnitude":
        run = train(args, name, "--config.prune.method=magnitude", f"--config.prune.sparsity={value}",
                    f"--config.prune.end_step={int(args.steps * 0.6)}",
                    f"--config.prune.every={max(1, args.steps // 10)}")
        return served_copy(run, served)
    if kind == "nm":
        return served_copy(train(args, name, "--config.prune.method=nm"), served)
    if kind == "heads":
        run = train(args, name, "--config.prune.method=heads", f"--config.prune.heads_pruned={value}",
                    f"--config.prune.mlp_pruned={value}")
        prune_export.export(run, served)
        return served
    if kind in ("distill", "alone"):
        suffix = ":alone" if kind == "alone" else ""
        return served_copy(train(args, name, config=args.distill_config + suffix), served)
    raise ValueError(f"--methods: unknown method {method!r}")


def checkpoint_bytes(workdir: str) -> int:
    root = os.path.join(workdir, "checkpoints")
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files)


def describe(workdir: str, metric: str) -> dict:
    metrics = evaluate_lib.evaluate(workdir)
    _, params, _ = loop.restore_latest(workdir)
    leaves = [np.asarray(x) for name, x in zip(tree.names(params), jax.tree.leaves(params))
              if not name.endswith("_scale")]  # weights (or their codes), not quantization scales
    return {"metric": float(metrics[metric]), "params": int(sum(x.size for x in leaves)),
            "nonzero": int(sum(np.count_nonzero(x) for x in leaves)), "bytes": checkpoint_bytes(workdir)}


def latencies(workdirs: dict, rounds: int, calls: int) -> dict:
    """Median ms of one jitted eval batch per workdir, timed in interleaved rounds."""
    models = {}
    for name, workdir in workdirs.items():
        run, params, _ = loop.restore_latest(workdir)
        batch = next(iter(run.task.eval_batches(run.config.data.eval_split, 1)))
        fn = jax.jit(step_lib.make_eval_step(run.task))
        jax.block_until_ready(fn(params, batch))  # compile
        models[name] = (fn, params, batch)
    times = {name: [] for name in models}
    for _ in range(rounds):
        for name, (fn, params, batch) in models.items():
            for _ in range(calls):
                start = time.perf_counter()
                jax.block_until_ready(fn(params, batch))
                times[name].append(1000 * (time.perf_counter() - start))
    return {name: float(np.median(t)) for name, t in times.items()}


def write_report(rows: list[dict], args, command: str) -> str:
    base = rows[0]
    lines = [f"`{command}`", "",
             f"| method | {args.metric} | vs float | parameters | non-zero | MB on disk | x smaller | ms/batch |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['metric']:.4f} | {r['metric'] - base['metric']:+.4f} | "
                     f"{r['params']:,} | {r['nonzero'] / r['params']:.0%} | {r['bytes'] / 1e6:.1f} | "
                     f"{base['bytes'] / r['bytes']:.1f} | {r['ms']:.1f} |")
    table = "\n".join(lines)
    with open(os.path.join(args.output, "report.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.output, "report.json"), "w") as f:
        json.dump(rows, f, indent=1)
    plot(rows, args)
    return table


def plot(rows: list[dict], args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in ((axes[0], "bytes", "MB on disk"), (axes[1], "ms", "ms per eval batch")):
        for r in rows:
            x = r[key] / 1e6 if key == "bytes" else r[key]
            ax.scatter(x, r["metric"], color="black" if r["method"] == "float" else "tab:blue")
            ax.annotate(r["method"], (x, r["metric"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.axhline(rows[0]["metric"], color="gray", linestyle=":", linewidth=1)
        ax.set_xlabel(label)
        ax.set_ylabel(args.metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{os.path.basename(os.path.normpath(args.baseline))}: compressed models on this machine")
    fig.tight_layout()
    fig.savefig(os.path.join(args.output, "report.png"), dpi=120)


def parse(argv: list[str]) -> flags.FlagValues:
    """absl flags in a FlagValues of this call's own (tests import this module beside other tools)."""
    fv = flags.FlagValues()
    flags.DEFINE_string("baseline", None, "the trained run to compress (a jaxlm workdir)", flag_values=fv)
    flags.DEFINE_string("output", None, "a folder for the results (reruns skip finished ones)", flag_values=fv)
    flags.DEFINE_string("config", "configs/sst2.py", "the baseline's config file", flag_values=fv)
    flags.DEFINE_string("methods", "float,int8,w8a8,int4", "comma-separated methods (see above)", flag_values=fv)
    flags.DEFINE_string("metric", "accuracy", "the key of jaxlm.evaluate's metrics", flag_values=fv)
    flags.DEFINE_integer("steps", 300, "fine-tuning steps of the training methods", flag_values=fv)
    flags.DEFINE_float("lr", 3e-5, "learning rate of the training methods", flag_values=fv)
    flags.DEFINE_string("distill_config", "configs/distill_sst2.py", "the student's config file", flag_values=fv)
    flags.DEFINE_integer("distill_steps", 800, "training steps of the students", flag_values=fv)
    flags.DEFINE_integer("rounds", 3, "interleaved latency rounds", flag_values=fv)
    flags.DEFINE_integer("calls", 5, "timed eval batches per result and round", flag_values=fv)
    flags.mark_flags_as_required(["baseline", "output"], flag_values=fv)
    rest = fv(["compress_report.py", *argv])
    if len(rest) > 1:
        raise flags.Error(f"unexpected arguments {rest[1:]}")
    return fv


def main(argv=None):
    try:
        args = parse(sys.argv[1:] if argv is None else list(argv))
    except flags.Error as e:
        raise SystemExit(f"{e}\n{__doc__.splitlines()[2].strip()}") from None
    methods = [m for m in args.methods.split(",") if m]
    if methods[0] != "float":
        methods.insert(0, "float")  # the reference row
    os.makedirs(args.output, exist_ok=True)
    served = {m: compress(args, m) for m in methods}
    rows = [{"method": m, **describe(w, args.metric)} for m, w in served.items()]
    ms = latencies(served, args.rounds, args.calls)
    for r in rows:
        r["ms"] = ms[r["method"]]
    print(write_report(rows, args, "python " + " ".join(sys.argv)))
    print(f"wrote {args.output}/report.md, report.json, report.png")


if __name__ == "__main__":
    main()
