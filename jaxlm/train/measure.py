"""Measures a config's train call the way the trainer runs it (what `tools/benchmark.py` and
`tools/compare_meshes.py` print): compile time, step times, throughput, MFU, memory per device
(XLA's compiled peak next to `train.memory`'s estimate) and the losses of the timed steps.
"""

import time

import jax
import numpy as np

from jaxlm.train import loop, memory, metrics as metrics_lib, state as state_lib


def train_step(config, workdir: str, *, steps: int, warmup: int) -> dict:
    """Compiles and times the train call of `config`; returns the figures."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"need --steps >= 1 and --warmup >= 0, got {steps} and {warmup}")
    t = config.train
    run = loop.setup(config, workdir)
    partitioner = run.partitioner
    devices = list(partitioner.mesh.devices.flat)
    local = [d for d in devices if d.process_index == jax.process_index()]
    estimate = memory.estimate(run)
    if jax.process_index() == 0:
        print(memory.describe(estimate), flush=True)
    state = state_lib.init(partitioner, run.task, run.tx, jax.random.key(config.seed), run.shardings)
    train_iter = run.task.train_iterator()
    k = t.steps_per_call

    def next_batches():
        batches = [next(train_iter) for _ in range(k)]
        stacked = {key: np.stack([b[key] for b in batches]) for key in batches[0]}
        return jax.block_until_ready(partitioner.shard_batch(stacked, loop.STACKED))

    batches = next_batches()
    start = time.perf_counter()
    lowered = loop.make_train_call(run).lower(state, batches)
    lower_s = time.perf_counter() - start
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start

    losses = []
    for _ in range(warmup):
        state, step_metrics = jax.block_until_ready(compiled(state, batches))
        losses.append(step_metrics["loss"])
        batches = next_batches()
    call_s, data_s = [], []
    for i in range(steps):
        if i:
            start = time.perf_counter()
            batches = next_batches()
            data_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        state, step_metrics = jax.block_until_ready(compiled(state, batches))
        call_s.append(time.perf_counter() - start)
        losses.append(step_metrics["loss"])
    losses = np.concatenate(jax.device_get(losses))

    peak_flops = t.peak_flops or metrics_lib.measure_matmul_peak(local[0])
    tokens_per_step = t.batch_size * run.task.tokens_per_example
    flops_per_step = tokens_per_step * metrics_lib.flops_per_token(
        config.model, metrics_lib.matmul_params(config.model, state.params), run.task.tokens_per_example)
    p10, p50, p90 = np.percentile(call_s, [10, 50, 90]) / k
    compiled_memory = compiled.memory_analysis()
    device_stats = [d.memory_stats() or {} for d in local]
    device_peaks = [s["peak_bytes_in_use"] for s in device_stats if "peak_bytes_in_use" in s]
    return dict(
        device_kind=devices[0].device_kind,
        num_devices=len(devices),
        mesh=dict(partitioner.mesh.shape),
        params=metrics_lib.count_params(state.params),
        batch_size=t.batch_size,
        seq_len=config.data.seq_len,
        tokens_per_step=tokens_per_step,
        steps_per_call=k,
        steps=steps,
        warmup=warmup,
        lower_s=lower_s,
        compile_s=compile_s,
        ms_per_step=1e3 * p50,
        ms_per_step_p10=1e3 * p10,
        ms_per_step_p90=1e3 * p90,
        data_ms_per_step=1e3 * float(np.median(data_s)) / k if data_s else 0.0,
        tokens_per_sec=tokens_per_step / p50,
        flops_per_step=flops_per_step,
        flops_per_sec=flops_per_step / p50,
        peak_flops_per_device=peak_flops,
        peak_flops_measured=not t.peak_flops,
        mfu=flops_per_step / p50 / (peak_flops * len(devices)),
        compiled_argument_bytes=compiled_memory.argument_size_in_bytes,
        compiled_output_bytes=compiled_memory.output_size_in_bytes,
        compiled_temp_bytes=compiled_memory.temp_size_in_bytes,
        compiled_alias_bytes=compiled_memory.alias_size_in_bytes,
        peak_mem_bytes=(compiled_memory.argument_size_in_bytes + compiled_memory.output_size_in_bytes
                        + compiled_memory.temp_size_in_bytes - compiled_memory.alias_size_in_bytes),
        device_peak_mem_bytes=max(device_peaks) if device_peaks else None,
        **{f"est_{k}_bytes": v for k, v in estimate.items()},
        losses=[float(x) for x in losses],
        loss_first=float(losses[0]),
        loss_last=float(losses[-1]),
    )
