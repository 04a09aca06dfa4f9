"""ViT: image patches -> a pre-norm Transformer encoder -> a class token (or mean, or attention
pooling) -> logits."""

import flax.linen as nn
import jax.numpy as jnp

from jaxlm.models import heads
from jaxlm.models.layers import (Attention, BlockConfig, Dropout, Mlp, block_config, constrain, dense,
                                 learned_positions, norm)
from jaxlm.models.transformer import Context, Stack, StackConfig, stack_config

POOLS = ("cls", "mean", "map")


class MapHead(nn.Module):
    """Multihead attention pooling (SigLIP's `map`): a learned probe attends over every token
    (a cross-attention with biases), then a pre-norm MLP residual. [batch, embed] of tokens
    [batch, length, embed]."""

    cfg: BlockConfig

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        cfg = self.cfg
        batch, length, emb = x.shape
        probe = self.param("probe", nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                                                 (None, None, "embed")),
                           (1, 1, emb), cfg.param_dtype)
        query = jnp.broadcast_to(probe, (batch, 1, emb)).reshape(batch, emb).astype(cfg.dtype)
        y = Attention(cfg, causal=False, cross=True, name="attn")(
            query, jnp.zeros((batch, 1), jnp.int32), memory=x.reshape(batch * length, emb),
            deterministic=deterministic)
        return y + Mlp(cfg, name="mlp")(norm(cfg, "norm")(y).astype(cfg.dtype), deterministic)


class ViT(nn.Module):
    num_classes: int  # 0: no head, the pooled features [batch, embed] (a dual encoder's image tower)
    image_size: int
    patch_size: int
    num_layers: int
    cfg: BlockConfig
    pool: str = "cls"  # see POOLS: the class token, the mean of the tokens, or MapHead (no class token)
    pre_norm: bool = False  # CLIP: a LayerNorm on the embeddings before the encoder (`pre_norm`)
    pixel_mean: tuple = ()  # per channel: the model sees (pixels - mean) / std; () leaves pixels as given
    pixel_std: tuple = ()
    stack: StackConfig = StackConfig()
    tokens: bool = False  # every position's features [batch, positions, embed] (an image-to-text encoder)

    @nn.compact
    def __call__(self, images, deterministic: bool = True):
        """Logits [batch, num_classes] (float32) for images [batch, height, width, channels] of
        pixels in [0, 1], or with num_classes=0 the pooled features [batch, embed], or with
        `tokens` every position's."""
        cfg, p = self.cfg, self.patch_size
        batch, height, width, channels = images.shape
        if self.pixel_mean or self.pixel_std:
            mean, std = (jnp.asarray(v, jnp.float32) for v in (self.pixel_mean, self.pixel_std))
            if mean.shape != (channels,) or std.shape != (channels,):
                raise ValueError(f"model.pixel_mean={self.pixel_mean} and model.pixel_std={self.pixel_std} "
                                 f"need one value per channel of the images ({channels})")
            images = ((images - mean) / std).astype(images.dtype)
        if height % p or width % p:
            raise ValueError(f"images of {height}x{width} do not split into model.patch_size={p} patches")
        patches = images.reshape(batch, height // p, p, width // p, p, channels).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(batch, -1, p * p * channels)  # each patch flattened (row, col, channel)
        x = dense(cfg.emb_dim, (None, "embed"), cfg, "patch_embed", use_bias=True)(patches)
        if self.pool == "cls":
            cls = self.param("cls", nn.with_logical_partitioning(nn.initializers.zeros, (None, None, "embed")),
                             (1, 1, cfg.emb_dim), cfg.param_dtype)
            x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, cfg.emb_dim)).astype(x.dtype), x], 1)
        elif self.pool not in POOLS:
            raise ValueError(f"model.pool={self.pool!r}: expected one of {list(POOLS)}")
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
        if self.pool == "map":
            pooled = MapHead(cfg, name="map")(x, deterministic).astype(cfg.dtype)
        else:
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
               pre_norm=m.pre_norm, pixel_mean=tuple(m.pixel_mean), pixel_std=tuple(m.pixel_std))
