"""Transformer blocks and the layer stack (scanned or unrolled, with remat, pipelined), shared
by all families."""

import dataclasses
import re

import flax.linen as nn
import flax.struct
import jax

from jaxlm.models import pipeline_parallel
from jaxlm.models.layers import RESIDUAL_AXES, Array, Attention, BlockConfig, Dropout, Mlp, constrain, layer_config, norm

# The parameter scope of layer i of an unrolled stack (a scanned one is `layers`, stacked on axis 0).
LAYER = re.compile(r"^layers_(\d+)$")

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@dataclasses.dataclass(frozen=True)
class StackConfig:
    """How a family's layer stacks run: scanned (one compiled block with a leading `layers`
    axis) or a Python loop, the remat policy, and the pipeline schedule over the `stage` mesh
    axis (None: no pipeline parallelism)."""

    scan: bool = True
    remat: str = "none"
    pipeline: pipeline_parallel.Pipeline | None = None

    def __post_init__(self):
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat={self.remat!r}: expected one of {sorted(REMAT_POLICIES)}")


def stack_config(m, pipeline: pipeline_parallel.Pipeline | None = None) -> StackConfig:
    """The StackConfig of `config.model` (`m`) and the run's pipeline."""
    return StackConfig(scan=m.scan_layers, remat=m.remat, pipeline=pipeline)


@flax.struct.dataclass
class Context:
    """What every layer of a stack sees besides its input, computed once per forward pass.

    positions: int [batch, length] of the layer's tokens (rotary, KV-cache index).
    bias: additive self-attention bias (padding mask, relative positions) or None.
    memory: flat [batch * memory_length, embed] for cross-attention (the encoder output) or None.
    memory_bias: additive cross-attention bias (the memory's padding mask) or None.
    segment_ids: int [batch, length] of packed examples (self-attention stays inside each) or None.
    """

    positions: Array
    bias: Array | None = None
    memory: Array | None = None
    memory_bias: Array | None = None
    segment_ids: Array | None = None


class Block(nn.Module):
    """Self-attention (+ cross-attention when `cross`) + MLP, each a residual branch.

    Pre-norm (GPT-2, T5, ViT: normalize the branch input; with `cfg.post_branch_norm` its output
    too, Gemma 2 and 3) or, with `cfg.post_norm`, post-norm (BERT: normalize after each residual
    add).
    """

    cfg: BlockConfig
    causal: bool = True
    cross: bool = False
    max_len: int = 0

    @nn.compact
    def __call__(self, x, ctx: Context, deterministic: bool = True, decode: bool = False):
        cfg = self.cfg
        branches = [("attn", lambda h: Attention(cfg, self.causal, self.max_len, name="attn")(
            h, ctx.positions, ctx.bias, None, deterministic, decode, ctx.segment_ids))]
        if self.cross:
            branches.append(("cross", lambda h: Attention(cfg, False, cross=True, name="cross_attn")(
                h, ctx.positions, ctx.memory_bias, ctx.memory, deterministic)))
        branches.append(("mlp", lambda h: Mlp(cfg, name="mlp")(h, deterministic)))
        for name, branch in branches:
            if cfg.post_norm:
                x = norm(cfg, f"{name}_norm")(x + self.branch_output(name, branch(x), deterministic))
            else:
                h = branch(norm(cfg, f"{name}_norm")(x))
                if cfg.post_branch_norm:
                    h = norm(cfg, f"{name}_post_norm")(h).astype(cfg.dtype)
                x = x + self.branch_output(name, h, deterministic)
            x = constrain(x, RESIDUAL_AXES)
        return x.astype(cfg.dtype), None  # (carry, output) so the block can be scanned

    def branch_output(self, name: str, h, deterministic: bool):
        """Branch `name`'s output ('attn', 'cross', 'mlp') as added to the residual: after
        dropout. Adapters attach here."""
        return Dropout(self.cfg.dropout)(h, deterministic=deterministic)


class Stack(nn.Module):
    """`num_layers` blocks as `stack` says: one scanned block with a leading `layers` axis, or a
    Python loop; remat; with a pipeline (mesh.stage > 1) training and evaluation run the scanned
    block's parameters through `pipeline_parallel.run`, while initialization and KV-cache decoding
    run the plain scan, so the parameters are the same tree either way.

    `__call__` is where soft prompts attach (before a bidirectional stack's input).
    """

    num_layers: int
    stack: StackConfig = StackConfig()
    block_kwargs: dict = None

    @property
    def bidirectional(self) -> bool:
        return not (self.block_kwargs or {}).get("causal", True)

    @nn.compact
    def __call__(self, x, ctx: Context, deterministic: bool = True, decode: bool = False):
        stack = self.stack
        if stack.pipeline is not None:
            if not stack.scan:
                raise ValueError("pipeline parallelism (mesh.stage > 1) needs model.scan_layers=True")
            if not (self.is_initializing() or decode):
                return self._pipelined(x, ctx, deterministic)
        block = Block
        if stack.remat != "none":
            block = nn.remat(block, policy=REMAT_POLICIES[stack.remat], prevent_cse=not stack.scan,
                             static_argnums=(3, 4))
        kwargs = self.block_kwargs or {}
        alternating = kwargs.get("cfg") is not None and kwargs["cfg"].sliding_window_pattern
        if alternating and stack.scan:
            raise ValueError("model.sliding_window_pattern (alternating local and global layers) needs "
                             "model.scan_layers=False")
        if stack.scan:
            scanned = nn.scan(
                block,
                variable_axes={"params": 0, "cache": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                length=self.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = scanned(name="layers", **kwargs)(x, ctx, deterministic, decode)
            return x
        for i in range(self.num_layers):
            layer_kwargs = {**kwargs, "cfg": layer_config(kwargs["cfg"], i)} if alternating else kwargs
            x, _ = block(name=f"layers_{i}", **layer_kwargs)(x, ctx, deterministic, decode)
        return x

    def _pipelined(self, x, ctx: Context, deterministic: bool):
        block = Block(**(self.block_kwargs or {}), parent=None)

        def layer(params, h, layer_ctx, rng):
            rngs = {} if rng is None else {"dropout": rng}
            return block.apply({"params": params}, h, layer_ctx, deterministic, rngs=rngs)[0]

        if self.stack.remat != "none":
            layer = jax.checkpoint(layer, policy=REMAT_POLICIES[self.stack.remat])
        dropout = not deterministic and block.cfg.dropout > 0
        rng = self.make_rng("dropout") if dropout else None
        return pipeline_parallel.run(self.stack.pipeline, layer, self.variables["params"]["layers"], x, ctx, rng)
