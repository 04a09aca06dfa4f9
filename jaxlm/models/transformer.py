"""Transformer blocks and the layer stack (scanned or unrolled, with remat), shared by all families."""

import flax.linen as nn
import flax.struct
import jax

from jaxlm.models.layers import RESIDUAL_AXES, Array, Attention, BlockConfig, Mlp, constrain, norm
from jaxlm.parallel import pipeline as pipeline_lib
from jaxlm.peft import adapters, prompts

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@flax.struct.dataclass
class Context:
    """What every layer of a stack sees besides its input, computed once per forward pass.

    positions: int [batch, length] of the layer's tokens (rotary, KV-cache index).
    bias: additive self-attention bias (padding mask, relative positions) or None.
    memory: flat [batch * memory_length, embed] for cross-attention (the encoder output) or None.
    memory_bias: additive cross-attention bias (the memory's padding mask) or None.
    """

    positions: Array
    bias: Array | None = None
    memory: Array | None = None
    memory_bias: Array | None = None


class Block(nn.Module):
    """Self-attention (+ cross-attention when `cross`) + MLP, each a residual branch.

    Pre-norm (GPT-2, T5, ViT: normalize the branch input) or, with `cfg.post_norm`, post-norm
    (BERT: normalize after each residual add).
    """

    cfg: BlockConfig
    causal: bool = True
    cross: bool = False
    max_len: int = 0

    @nn.compact
    def __call__(self, x, ctx: Context, deterministic: bool = True, decode: bool = False):
        cfg = self.cfg
        branches = [("attn", lambda h: Attention(cfg, self.causal, self.max_len, name="attn")(
            h, ctx.positions, ctx.bias, None, deterministic, decode))]
        if self.cross:
            branches.append(("cross", lambda h: Attention(cfg, False, name="cross_attn")(
                h, ctx.positions, ctx.memory_bias, ctx.memory, deterministic)))
        branches.append(("mlp", lambda h: Mlp(cfg, name="mlp")(h, deterministic)))
        for name, branch in branches:
            if cfg.post_norm:
                x = norm(cfg, f"{name}_norm")(x + self._output(name, branch(x), deterministic))
            else:
                x = x + self._output(name, branch(norm(cfg, f"{name}_norm")(x)), deterministic)
            x = constrain(x, RESIDUAL_AXES)
        return x.astype(cfg.dtype), None  # (carry, output) so the block can be scanned

    def _output(self, name, h, deterministic):
        """A branch's output as added to the residual: dropout, then the adapter if any."""
        h = nn.Dropout(self.cfg.dropout)(h, deterministic=deterministic)
        if self.cfg.peft.adapter_applies(name):
            h = adapters.Adapter(self.cfg.peft.adapter_dim, self.cfg, name=f"adapter_{name}")(h)
        return h


class Stack(nn.Module):
    """`num_layers` blocks: one scanned block with a leading `layers` axis, or a Python loop.

    With `peft.method='prompt'` a bidirectional stack (an encoder) reads learned soft tokens
    before its input and drops them from its output.

    With a `pipeline` (mesh.stage > 1) training and evaluation run the scanned block's parameters
    through `parallel.pipeline`; initialization and KV-cache decoding run the plain scan, so the
    parameters are the same tree either way.
    """

    num_layers: int
    scan: bool = True
    remat: str = "none"
    block_kwargs: dict = None
    pipeline: pipeline_lib.Pipeline | None = None

    @nn.compact
    def __call__(self, x, ctx: Context, deterministic: bool = True, decode: bool = False):
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat={self.remat!r}: expected one of {sorted(REMAT_POLICIES)}")
        kwargs = self.block_kwargs or {}
        cfg = kwargs["cfg"]
        if cfg.peft.method == "prompt" and not kwargs.get("causal", True):
            batch = ctx.positions.shape[0]
            x, ctx = prompts.prepend_prompt(self, x, ctx, cfg.peft, cfg)
            return prompts.drop_prompt(self._layers(x, ctx, deterministic, decode), batch, cfg.peft, cfg)
        return self._layers(x, ctx, deterministic, decode)

    def _layers(self, x, ctx: Context, deterministic: bool, decode: bool):
        if self.pipeline is not None:
            if not self.scan:
                raise ValueError("pipeline parallelism (mesh.stage > 1) needs model.scan_layers=True")
            if not (self.is_initializing() or decode):
                return self._pipelined(x, ctx, deterministic)
        block = Block
        if self.remat != "none":
            block = nn.remat(block, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan,
                             static_argnums=(3, 4))
        kwargs = self.block_kwargs or {}
        if self.scan:
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
            x, _ = block(name=f"layers_{i}", **kwargs)(x, ctx, deterministic, decode)
        return x

    def _pipelined(self, x, ctx: Context, deterministic: bool):
        block = Block(**(self.block_kwargs or {}), parent=None)

        def layer(params, h, layer_ctx, rng):
            rngs = {} if rng is None else {"dropout": rng}
            return block.apply({"params": params}, h, layer_ctx, deterministic, rngs=rngs)[0]

        if self.remat != "none":
            layer = jax.checkpoint(layer, policy=REMAT_POLICIES[self.remat])
        dropout = not deterministic and block.cfg.dropout > 0
        rng = self.make_rng("dropout") if dropout else None
        return pipeline_lib.run(self.pipeline, layer, self.variables["params"]["layers"], x, ctx, rng)
