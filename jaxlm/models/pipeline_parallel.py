"""Pipeline parallelism over the `stage` mesh axis, as sharding rather than hand-written sends.

The scanned layer stack keeps its parameters as [num_layers, ...] (the same tree as without a
pipeline, so checkpoints move between meshes); the `layers` axis is sharded over `stage`, which
gives each stage device a contiguous block of layers. A step cuts the batch into M microbatches
and runs R * M + S - 1 iterations; in each, every stage applies its layers to the activations it
holds (one `vmap` over stages, partitioned over `stage` by XLA), then the activations shift one
stage on (a collective permute). Stage 0 reads microbatches from a buffer into which the last
stage writes what it finished, so the same loop runs both schedules:

- GPipe (R = 1): stage s holds layers [s * L/S, (s + 1) * L/S); idle fraction (S-1) / (M+S-1).
- Circular (R > 1): the stack is cut into S * R groups and group g runs on stage g % S, so each
  stage holds R non-adjacent groups and a microbatch loops R times around the stages; idle
  fraction (S-1) / (R*M+S-1). Needs M >= S (a microbatch is back at stage 0 before stage 0 asks
  for it). The stack is stored in depth order, so each step regroups its layers for the circular
  assignment: one all-to-all of the stack's parameters (and of their gradients) per step.

Microbatch m is the batch rows b with b % M == m, so splitting keeps every row on its device.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from jaxlm.parallel.partitioner import MESH_AXES, mesh_shape

SCHEDULES = ("gpipe", "circular")
BUFFER_AXES = (None, "batch", "embed")  # [microbatches, microbatch tokens, embed]
STAGE_AXES = ("stage", "batch", "embed")  # [stages, microbatch tokens, embed]


@dataclasses.dataclass(frozen=True)
class Pipeline:
    stages: int
    microbatches: int
    schedule: str = "gpipe"
    repeats: int = 1

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"pipeline.schedule={self.schedule!r}: expected one of {SCHEDULES}")
        if self.schedule == "gpipe" and self.repeats != 1:
            raise ValueError(f"pipeline.repeats={self.repeats} needs pipeline.schedule='circular'")
        if self.repeats < 1 or self.microbatches < 1:
            raise ValueError(f"pipeline.repeats={self.repeats} and pipeline.microbatches="
                             f"{self.microbatches} must be >= 1")
        if self.repeats > 1 and self.microbatches < self.stages:
            raise ValueError(f"the circular schedule needs pipeline.microbatches >= mesh.stage, got "
                             f"{self.microbatches} < {self.stages}")

    @property
    def iterations(self) -> int:
        return self.repeats * self.microbatches + self.stages - 1

    @property
    def bubble(self) -> float:
        """The idle fraction of stage-iterations: (S - 1) / (R * M + S - 1)."""
        return (self.stages - 1) / self.iterations

    def check(self, num_layers: int, batch: int) -> None:
        groups = self.stages * self.repeats
        if num_layers % groups:
            raise ValueError(f"{num_layers} layers do not split into mesh.stage={self.stages} x "
                             f"pipeline.repeats={self.repeats} equal groups")
        if batch % self.microbatches:
            raise ValueError(f"a batch of {batch} rows does not split into "
                             f"pipeline.microbatches={self.microbatches}")


def from_config(config) -> Pipeline | None:
    """The run's pipeline, or None when `mesh.stage` is 1."""
    stages = config.mesh.stage
    if stages == -1:
        stages = mesh_shape(config.mesh, config.mesh.num_devices or jax.device_count())[
            MESH_AXES.index("stage")]
    if stages == 1:
        return None
    p = config.pipeline
    return Pipeline(stages, p.microbatches or stages, p.schedule, p.repeats)


def schedule(pipe: Pipeline) -> tuple[np.ndarray, np.ndarray]:
    """(microbatch, repeat), int [iterations, stages]: what each stage works on at each iteration
    of `run` (-1 where it is idle). Stage s takes work item t - s, repeat-major."""
    item = np.arange(pipe.iterations)[:, None] - np.arange(pipe.stages)[None, :]
    busy = (item >= 0) & (item < pipe.repeats * pipe.microbatches)
    return np.where(busy, item % pipe.microbatches, -1), np.where(busy, item // pipe.microbatches, -1)


def schedule_utilization(pipe: Pipeline) -> float:
    """The busy share of the (stage, iteration) slots, counted from the schedule `run` follows."""
    return float(np.mean(schedule(pipe)[0] >= 0))


def run(pipe: Pipeline, layer, params, x, ctx, rng=None):
    """Applies the stacked layers `params` ([num_layers, ...] leaves) to flat activations `x`
    [batch * length, embed] through the pipeline.

    `layer(layer_params, x, ctx, rng)` applies one layer to one microbatch; `ctx` is a pytree whose
    leaves lead with the batch ([batch, ...], or flat [batch * n, ...]) or with 1 (shared by all
    rows). `rng` (or None) is folded with the layer index and the microbatch.
    """
    S, M, R = pipe.stages, pipe.microbatches, pipe.repeats
    num_layers = jax.tree.leaves(params)[0].shape[0]
    batch = jax.tree.leaves(ctx)[0].shape[0]
    pipe.check(num_layers, batch)
    group = num_layers // (S * R)
    stacked = jax.tree.map(lambda p: _on_stages(p.reshape(R, S, group, *p.shape[1:]), 1), params)
    buffer = nn.with_logical_constraint(_microbatches(x, batch, M), BUFFER_AXES)
    batched = jax.tree.map(lambda a: a.shape[0] % batch == 0, ctx)
    micro_ctx = jax.tree.map(lambda a, b: _microbatches(a, batch, M) if b else a, ctx, batched)
    stage_ids = jnp.arange(S)

    def stage(stage_params, h, stage_ctx, s, repeat, micro):
        def one_layer(h, inputs):
            p, j = inputs
            key = None if rng is None else jax.random.fold_in(
                jax.random.fold_in(rng, (repeat * S + s) * group + j), micro)
            return layer(p, h, stage_ctx, key), None
        return jax.lax.scan(one_layer, h, (stage_params, jnp.arange(group)))[0]

    def iteration(carry, t):
        outputs, buffer = carry
        item = t - stage_ids  # the (repeat, microbatch) work item of each stage, repeat-major
        micro, repeat = item % M, jnp.clip(item // M, 0, R - 1)
        first = jax.lax.dynamic_index_in_dim(buffer, t % M, 0)
        inputs = _on_stages(jnp.concatenate([first, outputs[:-1]], 0), 0)
        stage_params = jax.vmap(lambda p, r: jax.tree.map(lambda a: a[r], p), in_axes=(1, 0))(
            stacked, repeat)
        stage_ctx = jax.tree.map(lambda a, b: jnp.take(a, micro, axis=0) if b else
                                 jnp.broadcast_to(a, (S, *a.shape)), micro_ctx, batched)
        outputs = _vmap_stages(stage)(stage_params, inputs, stage_ctx, stage_ids, repeat, micro)
        outputs = nn.with_logical_constraint(outputs, STAGE_AXES)
        done = t - (S - 1)
        slot = done % M
        finished = jnp.where((done >= 0) & (done < R * M), outputs[-1],
                             jax.lax.dynamic_index_in_dim(buffer, slot, 0, keepdims=False))
        buffer = jax.lax.dynamic_update_index_in_dim(buffer, finished, slot, 0)
        return (outputs, nn.with_logical_constraint(buffer, BUFFER_AXES)), None

    outputs = jnp.zeros((S, *buffer.shape[1:]), buffer.dtype)
    (_, buffer), _ = jax.lax.scan(iteration, (outputs, buffer), jnp.arange(pipe.iterations))
    return _unmicrobatch(buffer, batch)


def _microbatches(a, batch: int, M: int):
    """[batch * n, ...] -> [M, batch / M * n, ...]; microbatch m holds the rows b % M == m."""
    n = a.shape[0] // batch
    a = a.reshape(batch // M, M, n, *a.shape[1:])
    return jnp.moveaxis(a, 1, 0).reshape(M, batch // M * n, *a.shape[3:])


def _unmicrobatch(a, batch: int):
    """The inverse of `_microbatches`."""
    M = a.shape[0]
    a = a.reshape(M, batch // M, -1, *a.shape[2:])
    return jnp.moveaxis(a, 0, 1).reshape(-1, *a.shape[3:])


def _stage_axis_in_mesh() -> bool:
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and "stage" in mesh.axis_names


def _on_stages(a, dim: int):
    """`a` with dimension `dim` sharded over `stage` (the others left to the compiler)."""
    if not _stage_axis_in_mesh():
        return a
    free = PartitionSpec.UNCONSTRAINED
    spec = PartitionSpec(*([free] * dim + ["stage"] + [free] * (a.ndim - dim - 1)))
    return jax.lax.with_sharding_constraint(a, spec)


def _vmap_stages(fn):
    """`vmap` over the leading stage dimension, partitioned over the `stage` mesh axis."""
    return jax.vmap(fn, spmd_axis_name="stage" if _stage_axis_in_mesh() else None)
