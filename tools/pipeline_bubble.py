r"""Measures the pipeline bubble of the GPipe and circular schedules against (S-1)/(R*M+S-1).

    python tools/pipeline_bubble.py --stages=4 --microbatches=8 --repeats=2 --layers=8

For each schedule: the idle fraction counted from the schedule `models.pipeline_parallel.run` follows,
the formula, and a timed one. The timed one runs a train step (forward and backward) of a stack
of jaxlm Transformer blocks through the pipeline on `stages` host CPU devices with M and with 2M
microbatches of the same size: the M extra microbatches add only useful work, T(2M) - T(M), so
the useful share of T(M) is (T(2M) - T(M)) / T(M) and the idle fraction 2 - T(2M) / T(M) (it
includes moving activations between stages).
"""

import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


FLAGS = flags.FLAGS
flags.DEFINE_integer("stages", 4, "pipeline stages (host CPU devices)")
flags.DEFINE_integer("microbatches", 8, "microbatches per step")
flags.DEFINE_integer("repeats", 2, "layer groups per stage (circular)")
flags.DEFINE_integer("layers", 8, "Transformer blocks in the stack")
flags.DEFINE_integer("microbatch_size", 4, "rows per microbatch")
flags.DEFINE_integer("length", 64, "tokens per row")
flags.DEFINE_integer("width", 128, "model width")
flags.DEFINE_integer("steps", 5, "timed steps (the fastest counts)")


def block_layer(width: int, heads: int):
    """A jaxlm Transformer block as `layer(params, x, ctx, rng)`, and its stacked parameters."""
    from jaxlm.models.layers import BlockConfig
    from jaxlm.models.transformer import Block, Context

    cfg = BlockConfig(emb_dim=width, num_heads=heads, head_dim=width // heads, mlp_dim=4 * width)
    block = Block(cfg, causal=True, parent=None)

    def layer(params, x, ctx, rng):
        return block.apply({"params": params}, x, Context(ctx), True)[0]

    def init(rng, length):
        positions = jnp.zeros((1, length), jnp.int32)
        return block.init(rng, jnp.zeros((length, width)), Context(positions))["params"]

    return layer, init


def timed(fn, *args, steps: int) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def main(argv):
    del argv
    args = FLAGS
    jax.config.update("jax_num_cpu_devices", args.stages)
    import flax.linen as nn
    import ml_collections

    from jaxlm.models import pipeline_parallel as pipeline
    from jaxlm.parallel.partitioner import make_mesh

    print("command: python tools/pipeline_bubble.py " + " ".join(sys.argv[1:]))
    layer, init = block_layer(args.width, 4)
    keys = jax.random.split(jax.random.key(0), args.layers)
    params = jax.vmap(lambda k: nn.unbox(init(k, args.length)))(keys)
    mesh = make_mesh(ml_collections.ConfigDict(
        dict(data=1, fsdp=1, tensor=1, stage=args.stages, num_devices=0)))

    def step_time(pipe, microbatches: int) -> float:
        pipe = dataclasses.replace(pipe, microbatches=microbatches)
        batch = microbatches * args.microbatch_size
        x = jax.random.normal(jax.random.key(1), (batch * args.length, args.width))
        positions = jnp.broadcast_to(jnp.arange(args.length), (batch, args.length))
        loss = lambda p: jnp.sum(pipeline.run(pipe, layer, p, x, positions) ** 2)
        with jax.set_mesh(mesh):
            return timed(jax.jit(jax.grad(loss)), params, steps=args.steps)

    S, M = args.stages, args.microbatches
    print(f"{'schedule':10s} {'S':>2s} {'M':>3s} {'R':>2s} {'formula':>8s} {'schedule':>9s} "
          f"{'timed':>7s} {'T(M) s':>7s} {'T(2M) s':>8s}")
    figures = {}
    for schedule, repeats in (("gpipe", 1), ("circular", args.repeats)):
        pipe = pipeline.Pipeline(S, M, schedule, repeats)
        once, twice = step_time(pipe, M), step_time(pipe, 2 * M)
        formula = (S - 1) / (repeats * M + S - 1)
        figures[schedule] = 2 - twice / once
        print(f"{schedule:10s} {S:2d} {M:3d} {repeats:2d} {formula:8.3f} "
              f"{1 - pipeline.schedule_utilization(pipe):9.3f} {figures[schedule]:7.3f} "
              f"{once:7.3f} {twice:8.3f}")
    print(" ".join(f"bubble_{k}_timed={v:.3f}" for k, v in figures.items()))


if __name__ == "__main__":
    app.run(main)
