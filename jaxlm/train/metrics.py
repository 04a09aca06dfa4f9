"""Where figures go: `metrics.jsonl`, TensorBoard event files, and a console progress bar."""

import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from jaxlm import config as config_lib
from jaxlm.models import bert


def _import_tensorboardx():
    """Imports tensorboardX without torch. tensorboardX imports torch whenever it is installed, only
    to accept torch tensors (jaxlm writes floats); beside torch, importing `jaxlm.main` took 4.1-4.3 s
    with it and takes 2.3-2.4 s without (a quiet 2-core machine). A `None` in `sys.modules` makes
    `import torch` fail, which tensorboardX handles; a torch the program has already imported is
    left as it is."""
    if "torch" in sys.modules:
        import tensorboardX  # pylint: disable=import-outside-toplevel
        return tensorboardX
    sys.modules["torch"] = None
    try:
        import tensorboardX  # pylint: disable=import-outside-toplevel
    finally:
        del sys.modules["torch"]
    return tensorboardX


SummaryWriter = _import_tensorboardx().SummaryWriter


class MetricWriter:
    """Appends one JSON object per logged step and mirrors it to TensorBoard (process 0 only).

    A run resumed at `start_step` first moves the lines of later steps (written by the run that
    crashed before saving them) from `metrics.jsonl` to `metrics.replayed.jsonl`: the resumed run
    writes those steps again, and each step appears once."""

    def __init__(self, workdir: str, start_step: int = 0):
        self.enabled = jax.process_index() == 0
        if self.enabled:
            set_aside_after(os.path.join(workdir, "metrics.jsonl"), start_step,
                            os.path.join(workdir, "metrics.replayed.jsonl"))
            self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            self.tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))
        self.has_hparams = False

    def hparams(self, config, metric_keys) -> None:
        """The run's config as TensorBoard hyperparameters (HParams tab), linked to its
        `metric_keys` (e.g. eval/loss) that the scalars of this run log."""
        self.has_hparams = True
        if not self.enabled:
            return
        from tensorboardX.summary import hparams  # pylint: disable=import-outside-toplevel

        flat = {}
        for key, value in config_lib.flatten(config.to_dict()).items():
            flat[key] = value if isinstance(value, (bool, int, float, str)) else str(value)
        writer = self.tensorboard._get_file_writer()  # pylint: disable=protected-access
        for summary in hparams(flat, {key: 0.0 for key in metric_keys}):
            writer.add_summary(summary)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        values = {k: float(v) for k, v in metrics.items()}
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        for key, value in values.items():
            self.tensorboard.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tensorboard.close()


def set_aside_after(path: str, step: int, aside: str) -> None:
    """Moves the lines of `path` whose step is after `step` to the end of `aside`."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    later = [line for line in lines if _line_step(line) > step]
    if not later:
        return
    with open(aside, "a") as f:
        f.writelines(later)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(line for line in lines if _line_step(line) <= step)
    os.replace(tmp, path)


def read_curves(workdir: str) -> dict[str, dict[int, float]]:
    """{key: {step: value}} of a run's metrics.jsonl, the one reader of it (tools, tests,
    notebooks); the last value of a step wins."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{workdir!r} has no metrics.jsonl: is it a jaxlm workdir?")
    curves: dict[str, dict[int, float]] = {}
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    curves.setdefault(key, {})[record["step"]] = float(value)
    return curves


def last_eval(curves: dict[str, dict[int, float]]) -> dict:
    """{'step': s, 'eval/...': value} of the last step with eval metrics ({} when none)."""
    steps = [step for key, values in curves.items() if key.startswith("eval/") for step in values]
    if not steps:
        return {}
    step = max(steps)
    return {"step": step, **{k: v[step] for k, v in curves.items() if k.startswith("eval/") and step in v}}


def _line_step(line: str) -> float:
    """The step of a metrics line; a line cut short by a crash counts as after every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError):
        return math.inf


def progress_bar(total: int, initial: int):
    return tqdm.tqdm(total=total, initial=initial, file=sys.stderr, dynamic_ncols=True,
                     disable=jax.process_index() != 0, unit="step", mininterval=1.0)


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


# Tables a model indexes rather than multiplies: learned positions, segments, word shapes.
LOOKUP_TABLES = ("pos_embedding", "type_embedding", bert.CASE_EMBEDDING)


def matmul_params(model_config, params) -> int:
    """The N of `flops_per_token`: the parameters that multiply activations. The lookup tables
    are left out, and so is the token embedding unless the output layer reuses it (a tied GPT or
    T5): an encoder's only indexes it (a BERT's masked-LM head reuses it on a few positions)."""
    tied = model_config.name in ("gpt", "t5") and model_config.tie_embeddings

    def lookup(path) -> bool:
        return any(name in LOOKUP_TABLES for name in path) or (path[-2:] == ("embed", "embedding") and not tied)

    leaves = jax.tree_util.tree_leaves_with_path(params)
    return sum(int(np.prod(x.shape)) for path, x in leaves if not lookup(tuple(getattr(k, "key", k) for k in path)))


def flops_per_token(model_config, num_matmul_params: int, seq_len: int) -> float:
    """Training FLOPs per token of sequences of `seq_len`, as nanoGPT/PaLM estimate them:
    6N + 12 * layers * width * length, N = `matmul_params`."""
    heads = model_config.num_heads * (model_config.head_dim or model_config.emb_dim // model_config.num_heads)
    return 6.0 * num_matmul_params + 12.0 * model_config.num_layers * heads * seq_len


def measure_matmul_peak(device=None, n: int = 2048, repeats: int = 5, dtype=jnp.float32) -> float:
    """FLOP/s of the fastest of `repeats` n x n matmuls of `dtype` on `device` (the MFU denominator)."""
    device = device or jax.local_devices()[0]
    x = jax.device_put(jnp.ones((n, n), dtype), device)
    matmul = jax.jit(lambda a: a @ a)
    matmul(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n ** 3 / best


def bytes_on_device(tree, device) -> int:
    """Bytes `device` holds of a tree of sharded arrays (or ShapeDtypeStructs with shardings)."""
    total = 0
    for x in jax.tree.leaves(tree):
        index = x.sharding.devices_indices_map(x.shape).get(device)
        if index is not None:  # an uneven shard is as long as its slice
            total += math.prod(len(range(*s.indices(n))) for s, n in zip(index, x.shape)) * x.dtype.itemsize
    return total
