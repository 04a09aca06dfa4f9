"""tools/benchmark.py end to end: a tiny quickstart model on 8 host CPU devices, FSDP over all 8.

The benchmark runs as a subprocess, as a user runs it (its absl flags would clash with other
modules' flags in this process); the environment, XLA_FLAGS from conftest included, is passed on.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

# The shape under test: quickstart (byte tokens, rotary, RMSNorm, SwiGLU with mlp_dim 352, tied
# embedding, no biases) shrunk to one layer of width 32.
VOCAB, WIDTH, LAYERS, MLP, SEQ, BATCH, STEPS_PER_CALL, DEVICES = 257, 32, 1, 352, 128, 16, 2, 8
PEAK = 1e9  # train.peak_flops, so that no matmul is measured and MFU can be checked exactly


def write_corpus(directory: Path) -> str:
    directory.mkdir()
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "import", "lambda", "(", ")", ":", "\n    "]
    for i in range(12):
        (directory / f"doc_{i:02d}.txt").write_text(" ".join(rng.choice(words, 600)))
    return str(directory / "*.txt")


def test_benchmark_figures(tmp_path):
    out = tmp_path / "figures.json"
    command = [
        sys.executable, str(ROOT / "tools" / "benchmark.py"), f"--config={ROOT / 'configs' / 'quickstart.py'}",
        f"--config.data.files={write_corpus(tmp_path / 'corpus')}",
        f"--config.data.data_dir={tmp_path / 'tfds'}",
        f"--config.model.num_layers={LAYERS}", f"--config.model.emb_dim={WIDTH}",
        f"--config.train.steps_per_call={STEPS_PER_CALL}", f"--config.train.peak_flops={PEAK}",
        "--config.mesh.data=1", f"--config.mesh.fsdp={DEVICES}",
        "--steps=3", "--warmup=1", f"--workdir={tmp_path / 'work'}", f"--json={out}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ),
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    last = result.stdout.strip().splitlines()[-1]
    summary = {k: float(v) for k, v in (pair.split("=", 1) for pair in last.split())}

    # Model FLOPs by hand: 6N + 12 * layers * width * length per token, N the matmul parameters.
    norms = (2 * LAYERS + 1) * WIDTH
    n = VOCAB * WIDTH + LAYERS * (4 * WIDTH * WIDTH + 3 * WIDTH * MLP) + norms
    tokens = BATCH * SEQ
    assert figures["params"] == n
    assert figures["flops_per_step"] == (6 * n + 12 * LAYERS * WIDTH * SEQ) * tokens
    assert summary["flops_per_step"] == float(f"{figures['flops_per_step']:.6g}")

    # Timings: positive, ordered, and the derived rates follow from the median.
    seconds = figures["ms_per_step"] / 1e3
    assert 0 < figures["ms_per_step_p10"] <= figures["ms_per_step"] <= figures["ms_per_step_p90"]
    assert summary["ms_per_step"] > 0 and summary["compile_s"] > 0
    assert np.isclose(figures["tokens_per_sec"], tokens / seconds)
    assert np.isclose(figures["mfu"], figures["flops_per_step"] / seconds / (PEAK * DEVICES))
    assert np.isclose(summary["mfu"], figures["mfu"], rtol=1e-3, atol=1e-5)

    # Memory on device 0: every kernel is split 8 ways over `fsdp`, the norm scales are replicated;
    # AdamW keeps two moments of each (plus a few scalars).
    params_bytes = 4 * ((n - norms) // DEVICES + norms)
    assert figures["est_params_bytes"] == params_bytes
    assert 2 * params_bytes <= figures["est_optimizer_bytes"] <= 2 * params_bytes + 64
    assert figures["est_gradients_bytes"] == params_bytes and figures["est_activations_bytes"] > 0
    assert result.stdout.startswith("memory per device (estimate): params ")
    # XLA's accounting agrees: the arguments are the state plus this device's share of the
    # stacked batches, and the donated state (with its int32 step) is exactly what is aliased.
    state_bytes = figures["est_params_bytes"] + figures["est_optimizer_bytes"] + 4
    batch_bytes = STEPS_PER_CALL * 2 * (BATCH // DEVICES) * SEQ * 4
    assert figures["compiled_argument_bytes"] == state_bytes + batch_bytes
    assert figures["compiled_alias_bytes"] == state_bytes
    assert summary["peak_mb"] > 0 and summary["estimate_mb"] == float(f"{figures['est_total_bytes'] / 2**20:.3f}")
    assert 0.5 < figures["est_total_bytes"] / figures["peak_mem_bytes"] < 2
    assert figures["mesh"] == {"data": 1, "fsdp": DEVICES, "tensor": 1, "stage": 1}
    assert np.isfinite(figures["loss_last"])


@pytest.mark.slow
def test_gpu_bench_runs_tiny_on_cpu_and_its_attentions_agree(tmp_path):
    """tools/gpu_bench.py end to end at its CPU sizes: every part reports, and XLA's attention
    computes what jaxlm's own kernel computes."""
    out = tmp_path / "gpu_bench.json"
    env = {**os.environ, "XLA_FLAGS": "", "JAX_NUM_CPU_DEVICES": "1"}
    subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_bench.py"), "--size=tiny", "--steps=2", f"--json={out}"],
                   check=True, env=env, cwd=tmp_path)
    figures = json.loads(out.read_text())
    assert figures["size"] == "tiny" and figures["gpt"]["ms_per_step"] > 0 and 0 < figures["gpt"]["mfu"]
    assert sorted(figures["attention"]) == ["jaxlm", "xla"]
    assert figures["attention"]["xla"]["max_abs_diff"] < 1e-5
    assert "tokens_per_sec" in figures["minilm"] or "skipped" in figures["minilm"]
    # The Llama part with the backend's own attention (jaxlm's on CPU) and XLA's, same model.
    assert sorted(figures["llama"]) == ["cpu", "xla"]
    assert figures["llama"]["cpu"]["params"] == figures["llama"]["xla"]["params"] > 0
    assert all(r["mfu"] > 0 for r in figures["llama"].values())
