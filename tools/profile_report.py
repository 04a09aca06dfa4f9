r"""Where a traced step's time goes: a profile from `--config.train.profile_steps=N`, summed.

    python -m jaxlm.main --config=configs/gpt_shakespeare_char.py --workdir=/tmp/prof \
        --config.train.steps=150 --config.train.profile_steps=50
    python tools/profile_report.py /tmp/prof [--steps=50] [--top=15]

Reads the newest `*.xplane.pb` under `WORKDIR/profile` (or the folder or file given). A device op
is an event that names the XLA op it ran (its `hlo_op`), on whatever thread ran it: XLA:CPU runs
small programs on the calling Python thread and large ones on its worker threads, so threads say
nothing; the Python tracer's frames, the runtime's dispatch and the data pipeline are host events.
The report gives:
- the wall time from the first traced op to the last and how much of it had some device op running; the rest is
  host work the device waited for (dispatch, Python, input) or idle;
- op time by kind: matmuls, layout (copy, transpose, slices), reductions, element-wise, collectives;
  read from the optimized HLO the trainer writes beside the trace (`*.hlo.txt`: what a fusion
  computes, not its name, decides: on XLA:CPU a `ynn_fusion` may be a matmul or a reduction);
  without it, from the op's name;
- op time by part of the step, forward and backward: attention, MLP, norms, embeddings and output
  layer, the loss, and the optimizer (with gradient clipping: what runs outside the model's
  forward and backward), from each op's `op_name`, which names the Flax module it came from;
- the longest ops.
With `--steps`, figures are per step. Open the same trace in TensorBoard's profile plugin or the
`perfetto_trace.json.gz` at ui.perfetto.dev to see it on a timeline.
"""

import collections
import dataclasses
import glob
import os
import re

from absl import app, flags

KINDS_BY_NAME = (  # (kind, pattern on the op's name), the first that matches
    ("collectives", r"all-reduce|all-gather|reduce-scatter|all-to-all|collective|send|recv"),
    ("matmul", r"dot|convolution|gemm|matmul|cublas|cudnn"),
    ("layout (copy/transpose)", r"copy|transpose|bitcast|dynamic-update-slice|concatenate|pad|slice"),
    ("reduction", r"reduce"),
    ("element-wise", r""),
)
COLLECTIVES = {"all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute", "send", "recv",
               "all-reduce-start", "all-gather-start", "collective-permute-start"}
LAYOUT = {"copy", "transpose", "bitcast", "reshape", "slice", "dynamic-slice", "dynamic-update-slice",
          "concatenate", "pad", "broadcast", "parameter", "constant", "tuple", "get-tuple-element", "gather",
          "scatter", "iota", "reverse"}
PARTS = (  # (part of the model, pattern on op_name's module path), the first that matches
    ("norms", r"norm"),
    ("attention", r"attn|attention"),
    ("MLP", r"mlp"),
    ("embeddings, output layer", r"embed|lm_head|head|_take|pooler|classifier"),
)
CONTAINERS = {"while", "call", "conditional", "async-start", "async-done"}  # their ops are traced too
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = .*?\s([\w\-]+)\(")
COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) ")


@dataclasses.dataclass
class Op:
    kind: str
    op_name: str = ""


def newest(path: str, pattern: str) -> str:
    if os.path.isfile(path):
        return path
    found = sorted(glob.glob(os.path.join(path, "**", pattern), recursive=True), key=os.path.getmtime)
    if not found:
        raise FileNotFoundError(f"no {pattern} under {path}: trace a run with --config.train.profile_steps=N first")
    return found[-1]


def kind_by_name(name: str) -> str:
    return next(kind for kind, pattern in KINDS_BY_NAME if re.search(pattern, name, re.I))


def kind_of(opcodes: set) -> str:
    """An op's kind from the opcodes it computes (a fusion's: those of the computation it calls)."""
    if opcodes & COLLECTIVES:
        return "collectives"
    if opcodes & {"dot", "convolution"}:
        return "matmul"
    if opcodes & {"reduce", "reduce-window"}:
        return "reduction"
    if opcodes <= LAYOUT:
        return "layout (copy/transpose)"
    return "element-wise"


def read_hlo(text: str) -> tuple:
    """(module name, {instruction name: Op}) of an optimized HLO module's text (`Compiled.as_text()`)."""
    opcodes, calls, names, computation = collections.defaultdict(set), {}, {}, ""
    for line in text.splitlines():
        if m := COMPUTATION.match(line):
            computation = m.group(1)
        elif m := INSTRUCTION.match(line):
            name, opcode = m.groups()
            if opcode == "custom-call" and re.search(r"matmul|gemm|dot|conv", line, re.I):
                opcode = "dot"
            opcodes[computation].add(opcode)
            called = re.search(r"calls=%([\w.\-]+)", line)
            op_name = re.search(r'op_name="([^"]*)"', line)
            calls[name] = (opcode, called.group(1) if called else None)
            names[name] = op_name.group(1) if op_name else ""
    ops = {}
    for name, (opcode, called) in calls.items():
        if opcode in CONTAINERS:
            continue
        ops[name] = Op(kind_of(opcodes[called] if opcode == "fusion" and called else {opcode}), names[name])
    return text.split(None, 2)[1].rstrip(","), ops  # "HloModule jit_steps, ..."


def part_of(op_name: str) -> str:
    """'forward: attention', 'backward: MLP', 'optimizer', ... from a JAX op_name such as
    'jit(steps)/while/body/closed_call/transpose(jvp(GPT))/decoder/layers_0/attn/dot_general'."""
    backward = re.search(r"transpose\(jvp\(", op_name)
    forward = backward or re.search(r"jvp\(", op_name)
    if not forward:
        return "optimizer, gradient clipping, step"
    path = op_name[forward.end():]
    part = next((part for part, pattern in PARTS if re.search(pattern, path, re.I)), "loss, other model ops")
    return f"{'backward' if backward else 'forward'}: {part}"


def read_trace(path: str):
    """Device events [(name, module, start, duration)] in ns."""
    from jax.profiler import ProfileData  # pylint: disable=import-outside-toplevel

    events = []
    for plane in ProfileData.from_file(path).planes:
        if plane.name.startswith(("/host:CPU", "/device:")):
            for line in plane.lines:
                for e in line.events:
                    stats = dict(e.stats)
                    if "hlo_op" in stats and stats["hlo_op"].split(".")[0] not in CONTAINERS:
                        events.append((stats["hlo_op"], stats.get("hlo_module", ""), e.start_ns, e.duration_ns))
    if not events:
        raise ValueError(f"{path} holds no device ops (events that name an hlo_op)")
    return events


def summarize(events: list, hlo: dict) -> dict:
    """Op time by kind, part and op; the wall time from the first op's start to the last op's end
    (the steps' host work between them included, the tracer's start and stop not). `hlo`:
    {module: {op name: Op}} of the programs whose HLO was written (the train call's); the ops of
    other programs (a finiteness check, a metric fetch) are summed under their module's name."""
    by_kind, by_part, by_op = collections.Counter(), collections.Counter(), collections.Counter()
    for name, module, _start, dur in events:
        ops = hlo.get(module)
        op = (ops or {}).get(name) or Op(kind_by_name(name))
        by_kind[op.kind] += dur
        by_op[(re.sub(r"\.\d+$", "", name), op.kind)] += dur
        if hlo:
            by_part[f"other programs: {module}" if ops is None else
                    part_of(op.op_name) if name in ops else "(not in the HLO written)"] += dur
    wall = max(s + d for _, _, s, d in events) - min(s for _, _, s, _ in events)
    return {"wall": wall, "ops": sum(by_kind.values()),
            "busy": _covered([(s, s + d) for _, _, s, d in events]),
            "by_kind": by_kind, "by_part": by_part, "by_op": by_op}


def _covered(spans: list) -> float:
    """Time covered by at least one span (device ops run on several threads at once)."""
    total, reach = 0.0, float("-inf")
    for s, t in sorted(spans):
        if t > reach:
            total += t - max(s, reach)
            reach = t
    return total


def table(title: str, counter: collections.Counter, total: float, div: float):
    print(f"\n{title}:\n| {title.split(' by ')[-1]} | ms | share |\n|---|---|---|")
    for key, ns in counter.most_common():
        print(f"| {key} | {ns / div:.2f} | {100 * ns / total:.1f}% |")


def main(argv):
    if len(argv) != 2:
        raise app.UsageError("give one PATH: a workdir, its profile folder, or an .xplane.pb")
    args, given = flags.FLAGS, argv[1]
    path = newest(os.path.join(given, "profile") if os.path.isdir(os.path.join(given, "profile")) else given,
                  "*.xplane.pb")
    hlo_files = sorted(glob.glob(os.path.join(os.path.dirname(path), "*.hlo.txt")))
    hlo = collections.defaultdict(dict)
    for hlo_file in hlo_files:  # one module at several batch lengths: the same names, the same ops
        with open(hlo_file) as f:
            module, ops = read_hlo(f.read())
        hlo[module] = {**ops, **hlo[module]}
    s = summarize(read_trace(path), hlo)
    per = f" per step of {args.steps}" if args.steps else ""
    div = (args.steps or 1) * 1e6  # ns -> ms
    print(f"trace: {path} ({len(hlo_files)} HLO programs beside it)")
    print(f"wall {s['wall'] / div:.1f} ms{per}; some device op running {s['busy'] / div:.1f} ms "
          f"({100 * s['busy'] / s['wall']:.0f}%); the rest (host: dispatch, Python, input; idle) "
          f"{(s['wall'] - s['busy']) / div:.1f} ms; op time summed over threads {s['ops'] / div:.1f} ms")
    table(f"op time{per} by kind", s["by_kind"], s["ops"], div)
    if s["by_part"]:
        table(f"op time{per} by part", s["by_part"], s["ops"], div)
    print(f"\ntop {args.top} ops:\n| op | kind | ms | share |\n|---|---|---|---|")
    for (op, kind), ns in s["by_op"].most_common(args.top):
        print(f"| {op} | {kind} | {ns / div:.2f} | {100 * ns / s['ops']:.1f}% |")


if __name__ == "__main__":
    flags.DEFINE_integer("steps", 0, "steps traced (for per-step figures)")
    flags.DEFINE_integer("top", 15, "how many of the longest ops to list")
    app.run(main)
