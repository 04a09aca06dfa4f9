"""Transformer blocks and the layer stack (scanned or unrolled, with remat), shared by all families."""

import flax.linen as nn
import jax

from jaxlm.models.layers import Attention, BlockConfig, Mlp, constrain, norm

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class DecoderBlock(nn.Module):
    """Pre-norm self-attention + MLP block (GPT-2 / Llama layout)."""

    cfg: BlockConfig
    causal: bool = True
    max_len: int = 0

    @nn.compact
    def __call__(self, x, positions, deterministic: bool = True, decode: bool = False):
        cfg = self.cfg
        drop = nn.Dropout(cfg.dropout)
        h = norm(cfg, "attn_norm")(x)
        h = Attention(cfg, causal=self.causal, max_len=self.max_len, name="attn")(
            h, positions, deterministic, decode)
        x = x + drop(h, deterministic=deterministic)
        h = Mlp(cfg, name="mlp")(norm(cfg, "mlp_norm")(x), deterministic)
        x = constrain(x + drop(h, deterministic=deterministic))
        return x, None  # (carry, output) so the block can be scanned


class Stack(nn.Module):
    """`num_layers` blocks: one scanned block with a leading `layers` axis, or a Python loop."""

    block: type[nn.Module]
    num_layers: int
    scan: bool = True
    remat: str = "none"
    block_kwargs: dict = None

    @nn.compact
    def __call__(self, x, positions, deterministic: bool = True, decode: bool = False):
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat={self.remat!r}: expected one of {sorted(REMAT_POLICIES)}")
        block = self.block
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
            x, _ = scanned(name="layers", **kwargs)(x, positions, deterministic, decode)
            return x
        for i in range(self.num_layers):
            x, _ = block(name=f"layers_{i}", **kwargs)(x, positions, deterministic, decode)
        return x
