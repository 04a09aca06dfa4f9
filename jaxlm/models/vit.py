"""ViT: image patches -> a pre-norm Transformer encoder -> a class token (or mean) -> logits."""

import flax.linen as nn
import jax.numpy as jnp

from jaxlm.models import heads
from jaxlm.models.layers import BlockConfig, Dropout, block_config, constrain, dense, learned_positions, norm
from jaxlm.models.transformer import Context, Stack, StackConfig, stack_config


class ViT(nn.Module):
    num_classes: int  # 0: no head, the pooled features [batch, embed] (a dual encoder's image tower)
    image_size: int
    patch_size: int
    num_layers: int
    cfg: BlockConfig
    pool: str = "cls"
    pre_norm: bool = False  # CLIP: a LayerNorm on the embeddings before the encoder (`pre_norm`)
    stack: StackConfig = StackConfig()
    tokens: bool = False  # every position's features [batch, positions, embed] (an image-to-text encoder)

    @nn.compact
    def __call__(self, images, deterministic: bool = True):
        """Logits [batch, num_classes] (float32) for images [batch, height, width, channels], or
        with num_classes=0 the pooled features [batch, embed], or with `tokens` every position's."""
        cfg, p = self.cfg, self.patch_size
        batch, height, width, channels = images.shape
        if height % p or width % p:
            raise ValueError(f"images of {height}x{width} do not split into model.patch_size={p} patches")
        patches = images.reshape(batch, height // p, p, width // p, p, channels).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(batch, -1, p * p * channels)  # each patch flattened (row, col, channel)
        x = dense(cfg.emb_dim, (None, "embed"), cfg, "patch_embed", use_bias=True)(patches)
        if self.pool == "cls":
            cls = self.param("cls", nn.with_logical_partitioning(nn.initializers.zeros, (None, None, "embed")),
                             (1, 1, cfg.emb_dim), cfg.param_dtype)
            x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, cfg.emb_dim)).astype(x.dtype), x], 1)
        elif self.pool != "mean":
            raise ValueError(f"model.pool={self.pool!r}: expected 'cls' or 'mean'")
        length = x.shape[1]
        x = x + learned_positions(self, length, cfg).astype(cfg.dtype)
        if self.pre_norm:
            x = norm(cfg, "pre_norm")(x).astype(cfg.dtype)
        x = Dropout(cfg.dropout)(constrain(x.reshape(batch * length, cfg.emb_dim)),
                                    deterministic=deterministic)
        positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
        x = Stack(self.num_layers, self.stack, block_kwargs=dict(cfg=cfg, causal=False), name="encoder")(x, Context(positions), deterministic)
        x = norm(cfg, "final_norm")(x).reshape(batch, length, cfg.emb_dim).astype(cfg.dtype)
        if self.tokens:
            return x
        pooled = x[:, 0] if self.pool == "cls" else jnp.mean(x, axis=1)
        if not self.num_classes:
            return pooled
        return heads.head(self.num_classes, cfg, "head")(pooled).astype(jnp.float32)


def from_config(m, pipeline=None, features: bool = False, tokens: bool = False) -> ViT:
    """The ViT of `config.model` (`m`); with `features`, without a head (an image tower); with
    `tokens`, without pooling either (an encoder whose every position a decoder attends to)."""
    features = features or tokens
    if (m.num_classes <= 0 and not features) or m.image_size <= 0:
        raise ValueError("model.num_classes and model.image_size must be set (the task takes them from the data)")
    return ViT(num_classes=0 if features else m.num_classes, image_size=m.image_size, patch_size=m.patch_size,
               num_layers=m.num_layers, cfg=block_config(m), pool=m.pool, stack=stack_config(m, pipeline), tokens=tokens,
               pre_norm=m.pre_norm)
