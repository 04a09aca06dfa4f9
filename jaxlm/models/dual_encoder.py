"""A dual encoder (CLIP, SigLIP): an image tower (ViT) and a text tower (BERT) from the one core,
each pooled, projected to a shared space and L2-normalised.

Parameters: `text/` (the BERT), `image/` (the ViT without a head), `text_projection`,
`image_projection` ([tower width, projection_dim], no bias, as CLIP's). The text tower pools the
mean of its last hidden states over the real tokens (as sentence-transformers' MiniLM does); the
image tower its class token (or mean, `pool`).
"""

import flax.linen as nn
import jax.numpy as jnp

from jaxlm.models import bert, vit
from jaxlm.models.layers import BlockConfig, block_config, dense


def unit(x):
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def mean_pool(hidden, input_mask):
    """Mean of `hidden` [n, l, e] over the positions where `input_mask` [n, l] is set."""
    mask = input_mask[..., None].astype(jnp.float32)
    return (hidden.astype(jnp.float32) * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)


class DualEncoder(nn.Module):
    text: nn.Module
    image: nn.Module
    projection_dim: int
    cfg: BlockConfig  # the projections' numerics and initialisation

    def setup(self):
        self.text_projection = dense(self.projection_dim, ("embed", None), self.cfg, use_bias=False)
        self.image_projection = dense(self.projection_dim, ("embed", None), self.cfg, use_bias=False)

    def encode_text(self, input_ids, input_mask, deterministic: bool = True):
        """Unit text embeddings float32 [n, projection_dim] of token rows [n, l]."""
        hidden = self.text(input_ids, input_mask=input_mask, deterministic=deterministic)["hidden"]
        return unit(self.text_projection(mean_pool(hidden, input_mask)))

    def encode_image(self, images, deterministic: bool = True):
        """Unit image embeddings float32 [n, projection_dim] of images [n, h, w, c]."""
        return unit(self.image_projection(self.image(images, deterministic=deterministic)))

    def __call__(self, images, input_ids, input_mask, deterministic: bool = True):
        return (self.encode_image(images, deterministic),
                self.encode_text(input_ids, input_mask, deterministic))


def from_config(text, image, projection_dim: int, pipeline=None) -> DualEncoder:
    """The dual encoder of a text tower `config.model` (BERT) and an image tower
    `config.image_model` (ViT)."""
    if text.name != "bert" or image.name != "vit":
        raise ValueError(f"a dual encoder pairs a bert text tower (model.name) with a vit image tower "
                         f"(image_model.name), not {text.name!r} and {image.name!r}")
    return DualEncoder(text=bert.from_config(text, pipeline, heads=()), image=vit.from_config(image, pipeline, features=True),
                       projection_dim=projection_dim, cfg=block_config(text, post_norm=True))
