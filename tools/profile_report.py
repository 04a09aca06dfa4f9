r"""Where a traced step's time goes: a profile from `--config.train.profile_steps=N`, summed.

    python -m jaxlm.main --config=configs/gpt_shakespeare_char.py --workdir=/tmp/prof \
        --config.train.steps=150 --config.train.profile_steps=50
    python tools/profile_report.py /tmp/prof [--steps=50] [--top=15]

Reads the newest `perfetto_trace.json.gz` under `WORKDIR/profile` (or the folder or file given)
and sums the durations of the device's ops (on CPU: the XLA executor threads) by kind:
matmuls (dot, convolution and the fused library calls that run them), layout (copy, transpose),
reductions, element-wise fusions, collectives, and the rest; then the host's share: the wall
time of the traced span not covered by any device op. With `--steps`, figures are also given per
step. The top ops by time follow, with their names as XLA gave them (open the same trace at
ui.perfetto.dev, or the folder in TensorBoard's profile plugin, to see them on a timeline).
"""

import collections
import glob
import gzip
import json
import os
import re

from absl import app, flags

KINDS = (  # (kind, pattern on the op name), the first that matches
    ("collectives", r"all-reduce|all-gather|reduce-scatter|all-to-all|collective|send|recv"),
    ("matmul", r"dot|convolution|gemm|matmul|ynn|onednn|xnn|cublas|cudnn"),
    ("layout (copy/transpose)", r"copy|transpose|bitcast|dynamic-update-slice|concatenate|pad|slice"),
    ("reduction", r"reduce"),
    ("element-wise fusion", r"fusion|add|multiply|exp|select|convert|broadcast|tanh|divide"),
)
HOST_THREAD = re.compile(r"python|main", re.I)
IGNORED = re.compile(r"ThreadpoolListener|Await|ThunkExecutor|^end: |Execute|wait", re.I)


def trace_file(path: str) -> str:
    if os.path.isfile(path):
        return path
    found = sorted(glob.glob(os.path.join(path, "**", "perfetto_trace.json.gz"), recursive=True), key=os.path.getmtime)
    if not found:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {path}: trace a run with "
                                "--config.train.profile_steps=N first")
    return found[-1]


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name, re.I):
            return kind
    return "other"


def summarize(events: list) -> dict:
    threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    device, host_spans = [], []
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        thread = threads.get((e["pid"], e.get("tid")), "")
        if HOST_THREAD.search(thread):
            host_spans.append((e["ts"], e["ts"] + e["dur"]))
        elif not IGNORED.search(e["name"]):
            device.append(e)
    if not device:
        raise ValueError("the trace holds no device ops")
    start = min(min(e["ts"] for e in device), min((s for s, _ in host_spans), default=float("inf")))
    end = max(max(e["ts"] + e["dur"] for e in device), max((t for _, t in host_spans), default=0))
    by_kind, by_op = collections.Counter(), collections.Counter()
    for e in device:
        by_kind[kind_of(e["name"])] += e["dur"]
        by_op[re.sub(r"\.\d+$", "", e["name"])] += e["dur"]
    return {"wall_us": end - start, "device_us": sum(by_kind.values()),
            "busy_us": _covered([(e["ts"], e["ts"] + e["dur"]) for e in device]),
            "by_kind": by_kind, "by_op": by_op}


def _covered(spans: list) -> float:
    """Microseconds covered by at least one span (device ops run on several threads at once)."""
    total, reach = 0.0, float("-inf")
    for s, t in sorted(spans):
        if t > reach:
            total += t - max(s, reach)
            reach = t
    return total


def main(argv):
    if len(argv) != 2:
        raise app.UsageError("give one PATH: a workdir, its profile folder, or a perfetto_trace.json.gz")
    args, given = flags.FLAGS, argv[1]
    path = trace_file(os.path.join(given, "profile") if os.path.isdir(os.path.join(given, "profile")) else given)
    with gzip.open(path) as f:
        data = json.load(f)
    s = summarize(data["traceEvents"] if isinstance(data, dict) else data)
    per = f" per step of {args.steps}" if args.steps else ""
    div = (args.steps or 1) * 1e3
    print(f"trace: {path}")
    print(f"wall {s['wall_us'] / div:.1f} ms{per}; some device op running {s['busy_us'] / div:.1f} ms "
          f"({100 * s['busy_us'] / s['wall_us']:.0f}%); the rest (host, dispatch, idle) "
          f"{(s['wall_us'] - s['busy_us']) / div:.1f} ms")
    print(f"\nop time summed over threads{per} (ms) by kind:")
    print("| kind | ms | share |\n|---|---|---|")
    for kind, us in s["by_kind"].most_common():
        print(f"| {kind} | {us / div:.2f} | {100 * us / s['device_us']:.1f}% |")
    print(f"\ntop {args.top} ops:")
    print("| op | kind | ms | share |\n|---|---|---|---|")
    for op, us in s["by_op"].most_common(args.top):
        print(f"| {op} | {kind_of(op)} | {us / div:.2f} | {100 * us / s['device_us']:.1f}% |")


if __name__ == "__main__":
    flags.DEFINE_integer("steps", 0, "steps traced (for per-step figures)")
    flags.DEFINE_integer("top", 15, "how many of the longest ops to list")
    app.run(main)
