r"""Short training runs recorded step by step, and two recordings compared (issue 14's equality).

    python tools/compare_runs.py run --output=/tmp/before.json [--only=baby_gpt,distill] \
        [--workroot=/tmp/before_runs]
    python tools/compare_runs.py compare /tmp/before.json /tmp/after.json [--only=baby_gpt]

`run` trains every case of `CASES` (or those `--only` names) as its own
`python -m jaxlm.main` process in a fresh workdir `WORKROOT/CASE`, on the CPU
(`JAX_PLATFORMS=cpu`; 8 host devices for the multi-device cases, 1 device for the others), with
the train loss logged at every step, eval only after the last step, no samples and one checkpoint
at the end. TFDS data is prepared once into `WORKROOT/tfds` and shared by the cases; the process's
output goes to `WORKROOT/CASE.log`. The JSON holds, per case, the command, every step's
`train/loss`, the final eval metrics, the wall time and the exit status.

`distill` learns from a teacher: the case `distill_teacher` (configs/sst2.py, full fine-tuning,
50 steps) trains it first, also when `--only` names `distill` alone.

`compare` prints per case the step count, whether the loss sequences (and the final eval
metrics) are bit-identical, and the largest absolute and relative loss differences; it exits 1
when a case is missing from either file or failed in either.
"""

import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from jaxlm.train import metrics as metrics_lib  # noqa: E402

HOST_DEVICES = "--xla_force_host_platform_device_count=8"
WORKROOT = "$WORKROOT"  # how the workroot is spelled in the commands that `compare` matches


@dataclasses.dataclass(frozen=True)
class Case:
    config: str
    steps: int
    overrides: tuple = ()
    devices: int = 1  # 1 or 8 host CPU devices
    needs: str = ""  # a case that must run first (its workdir is WORKROOT/needs)


# SST-2 at batch 8 with 20 eval batches (the config's batch 32 and whole dev set are slow on CPU).
# sst2_lora keeps the config's train batches cut to their longest row (4 lengths, 4 compiles);
# the other SST-2 cases pad every batch to seq_len: one compile each.
SST2 = ("--config.train.batch_size=8", "--config.train.eval_batches=20")
SST2_ONE_LENGTH = SST2 + ("--config.data.pad_multiple=0",)
PIPELINE = ("--config.model.scan_layers=True", "--config.mesh.stage=2", "--config.mesh.data=4",
            "--config.pipeline.microbatches=4", "--config.train.batch_size=16")
TENSOR = ("--config.mesh.data=4", "--config.mesh.tensor=2", "--config.model.vocab_multiple=8",
          "--config.train.batch_size=16")
GRADUAL = ("--config.prune.method=magnitude", "--config.prune.sparsity=0.5",
           "--config.prune.begin_step=10", "--config.prune.end_step=40", "--config.prune.every=10")

CASES = {
    "baby_gpt": Case("configs/gpt_shakespeare_char.py", 200),
    "sst2_lora": Case("configs/sst2.py:lora", 50, SST2),
    "sst2_adapter": Case("configs/sst2.py:adapter", 50, SST2_ONE_LENGTH),
    "sst2_prefix": Case("configs/sst2.py:prefix", 50, SST2_ONE_LENGTH),
    "sst2_qlora": Case("configs/sst2.py:lora", 50, SST2_ONE_LENGTH + ("--config.model.quant.weights=nf4",)),
    "prune_gradual": Case("configs/sst2.py", 60, SST2_ONE_LENGTH + GRADUAL),
    "distill_teacher": Case("configs/sst2.py", 50, SST2_ONE_LENGTH),
    "distill": Case("configs/distill_sst2.py", 50,
                    SST2_ONE_LENGTH + (f"--config.distill.teacher={WORKROOT}/distill_teacher",),
                    needs="distill_teacher"),
    "pipeline_stage2": Case("configs/gpt_shakespeare_char.py", 30, PIPELINE, devices=8),
    "tensor_parallel": Case("configs/gpt_shakespeare_char.py", 30, TENSOR, devices=8),
}


def command(name: str) -> tuple[dict, list]:
    """The environment variables and the argv of a case, the workroot spelled `$WORKROOT`."""
    case = CASES[name]
    env = {"JAX_PLATFORMS": "cpu"}
    if case.devices > 1:
        env["XLA_FLAGS"] = HOST_DEVICES
    argv = ["python", "-m", "jaxlm.main", f"--config={case.config}", f"--workdir={WORKROOT}/{name}",
            f"--config.train.steps={case.steps}", "--config.train.log_every=1",
            "--config.train.eval_every=1000000", "--config.checkpoint.every=1000000",
            "--config.sample.max_new_tokens=0", f"--config.data.data_dir={WORKROOT}/tfds"]
    if case.devices == 1:
        argv.append("--config.mesh.num_devices=1")
    return env, argv + list(case.overrides)


def read_metrics(workdir: str) -> tuple[list, dict]:
    """[(step, train/loss)] of every logged step and the last eval's metrics of a run."""
    if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
        return [], {}
    curves = metrics_lib.read_curves(workdir)
    return [[step, loss] for step, loss in sorted(curves.get("train/loss", {}).items())], metrics_lib.last_eval(curves)


def run_case(name: str, workroot: str) -> dict:
    env_vars, argv = command(name)
    argv = [a.replace(WORKROOT, workroot) for a in argv]
    shown = " ".join(f"{k}={v}" for k, v in env_vars.items()) + " " + shlex.join(argv)
    workdir = os.path.join(workroot, name)
    shutil.rmtree(workdir, ignore_errors=True)
    env = dict(os.environ, **env_vars, PYTHONPATH=os.pathsep.join(
        filter(None, [REPO, os.environ.get("PYTHONPATH", "")])))
    if "XLA_FLAGS" not in env_vars:
        env.pop("XLA_FLAGS", None)
    log_path = os.path.join(workroot, f"{name}.log")
    start = time.perf_counter()
    with open(log_path, "w") as log:
        returncode = subprocess.run([sys.executable] + argv[1:], check=False, cwd=REPO, env=env, stdout=log,
                                    stderr=subprocess.STDOUT).returncode
    wall_s = time.perf_counter() - start
    losses, final_eval = read_metrics(workdir)
    return {"command": shown, "returncode": returncode, "wall_s": round(wall_s, 1), "steps": len(losses),
            "losses": losses, "final_eval": final_eval, "log": log_path}


def run(output: str, only: str, workroot: str) -> int:
    wanted = set(only.split(",")) if only else set(CASES)
    if wanted - set(CASES):
        raise SystemExit(f"unknown case(s) {sorted(wanted - set(CASES))}; the cases are {list(CASES)}")
    wanted |= {CASES[name].needs for name in wanted if CASES[name].needs}
    names = [name for name in CASES if name in wanted]  # CASES lists a case after what it needs
    workroot = os.path.abspath(workroot or tempfile.mkdtemp(prefix="compare_runs_"))
    os.makedirs(workroot, exist_ok=True)
    git = subprocess.run(["git", "rev-parse", "HEAD"], check=False, cwd=REPO, capture_output=True, text=True)
    recording = {"repo": REPO, "commit": git.stdout.strip(), "workroot": workroot, "cases": {}}
    failed = 0
    for name in names:
        result = run_case(name, workroot)
        recording["cases"][name] = result
        failed += result["returncode"] != 0
        last = f"{result['losses'][-1][1]:.6f}" if result["losses"] else "-"
        print(f"{name:16s} rc={result['returncode']} steps={result['steps']:4d} last_loss={last} "
              f"eval={json.dumps(result['final_eval'])} {result['wall_s']:.1f}s", flush=True)
        with open(output, "w") as f:  # after every case: a long recording keeps what it has
            json.dump(recording, f, indent=1)
    return 1 if failed else 0


def loss_differences(before: list, after: list) -> tuple[float, float]:
    """The largest absolute and relative differences of the losses at the steps both logged."""
    after_by_step = {step: loss for step, loss in after}
    pairs = [(loss, after_by_step[step]) for step, loss in before if step in after_by_step]
    if not pairs:
        return float("nan"), float("nan")
    max_abs = max(abs(a - b) for a, b in pairs)
    max_rel = max(abs(a - b) / abs(a) if a else float(a != b) for a, b in pairs)
    return max_abs, max_rel


def compare(before_path: str, after_path: str, only: str) -> int:
    with open(before_path) as f:
        before = json.load(f)
    with open(after_path) as f:
        after = json.load(f)
    names = list(before["cases"]) + [n for n in after["cases"] if n not in before["cases"]]
    names = [name for name in names if name in only.split(",")] if only else names
    print(f"before: {before_path} ({before['commit'][:12]}), after: {after_path} ({after['commit'][:12]})")
    print(f"{'case':16s} {'steps':>9s} {'losses':>10s} {'max abs':>10s} {'max rel':>10s} "
          f"{'final eval':>10s}  notes")
    identical, problems = 0, 0
    for name in names:
        b, a = before["cases"].get(name), after["cases"].get(name)
        if b is None or a is None:
            problems += 1
            print(f"{name:16s} missing from {before_path if b is None else after_path}")
            continue
        notes = [f"{label} failed (rc={r['returncode']}, {r['log']})"
                 for label, r in (("before", b), ("after", a)) if r["returncode"] != 0]
        problems += bool(notes)
        same = b["losses"] == a["losses"] and not notes
        if b["command"].replace(before["workroot"], WORKROOT) != a["command"].replace(after["workroot"], WORKROOT):
            notes.append("the commands differ")
        identical += same
        max_abs, max_rel = loss_differences(b["losses"], a["losses"])
        steps = str(b["steps"]) if b["steps"] == a["steps"] else f"{b['steps']}/{a['steps']}"
        same_eval = ("-" if not b["final_eval"] and not a["final_eval"]
                     else "identical" if b["final_eval"] == a["final_eval"] else "differs")
        print(f"{name:16s} {steps:>9s} {'identical' if same else 'differ':>10s} {max_abs:10.3e} "
              f"{max_rel:10.3e} {same_eval:>10s}  {'; '.join(notes)}".rstrip())
    print(f"identical: {identical} of {len(names)} cases")
    return 1 if problems else 0


def main(argv) -> int:
    """`run` takes --output (required), --only, --workroot; `compare` takes BEFORE AFTER and --only."""
    command, *paths = argv[1:] or [""]
    args = flags.FLAGS
    if command == "run" and not paths:
        if not args.output:
            raise app.UsageError("run: --output=FILE.json is required")
        return run(args.output, args.only, args.workroot)
    if command == "compare" and len(paths) == 2:
        return compare(*paths, args.only)
    raise app.UsageError("usage: compare_runs.py run --output=FILE [--only=A,B] [--workroot=DIR] | "
                         "compare BEFORE AFTER [--only=A,B]")


if __name__ == "__main__":
    flags.DEFINE_string("output", None, "run: the JSON file to write")
    flags.DEFINE_string("only", "", f"comma-separated cases of {list(CASES)} (compare: default all in either)")
    flags.DEFINE_string("workroot", "", "run: where the workdirs go (default: a new temp dir)")
    app.run(main)
