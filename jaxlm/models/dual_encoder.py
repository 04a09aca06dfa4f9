"""A dual encoder (CLIP, SigLIP): an image tower (ViT) and a text tower (BERT, or GPT as CLIP's)
from the one core, each pooled, projected to a shared space and L2-normalised.

Parameters: `text/` (the BERT, or the GPT without its output layer), `image/` (the ViT without a
head), `text_projection`, `image_projection` ([tower width, projection_dim], no bias, as CLIP's).
The text tower pools (`model.text_pool`) the mean of its last hidden states over the real tokens
(as sentence-transformers' MiniLM does), or, for CLIP's causal tower, the state at the first
`model.eos_id` (`eos`) or at the largest id of the row (`max_id`: CLIP configs older than
transformers' PR #24773, whose EOS is the largest id, pool so); the image tower its class token
(or mean, `pool`).
"""

import flax.linen as nn
import jax.numpy as jnp

from jaxlm.models import bert, gpt, vit
from jaxlm.models.layers import BlockConfig, block_config, dense


def unit(x):
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def mean_pool(hidden, input_mask):
    """Mean of `hidden` [n, l, e] over the positions where `input_mask` [n, l] is set."""
    mask = input_mask[..., None].astype(jnp.float32)
    return (hidden.astype(jnp.float32) * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)


TEXT_POOLS = ("mean", "eos", "max_id")


def token_pool(hidden, input_ids, pool: str, eos_id: int):
    """`hidden` [n, l, e] at one position per row: the first holding `eos_id` (`eos`; position 0
    in a row without one, as transformers' CLIP) or the first holding the row's largest id
    (`max_id`)."""
    if pool == "eos":
        positions = jnp.argmax(input_ids == eos_id, axis=-1)
    else:
        positions = jnp.argmax(input_ids, axis=-1)
    return jnp.take_along_axis(hidden, positions[:, None, None], axis=1)[:, 0].astype(jnp.float32)


class DualEncoder(nn.Module):
    text: nn.Module
    image: nn.Module
    projection_dim: int
    cfg: BlockConfig  # the projections' numerics and initialisation
    text_pool: str = "mean"  # see TEXT_POOLS
    eos_id: int = -1  # text_pool=eos

    def setup(self):
        self.text_projection = dense(self.projection_dim, ("embed", None), self.cfg, use_bias=False)
        self.image_projection = dense(self.projection_dim, ("embed", None), self.cfg, use_bias=False)

    def encode_text(self, input_ids, input_mask, deterministic: bool = True):
        """Unit text embeddings float32 [n, projection_dim] of token rows [n, l]."""
        if isinstance(self.text, bert.BERT):
            hidden = self.text(input_ids, input_mask=input_mask, deterministic=deterministic)["hidden"]
        else:  # a causal GPT: padding hidden from the keys, as transformers' CLIP does
            hidden = self.text(input_ids, key_mask=input_mask, deterministic=deterministic)
        if self.text_pool == "mean":
            pooled = mean_pool(hidden, input_mask)
        else:
            pooled = token_pool(hidden, input_ids, self.text_pool, self.eos_id)
        return unit(self.text_projection(pooled))

    def encode_image(self, images, deterministic: bool = True):
        """Unit image embeddings float32 [n, projection_dim] of images [n, h, w, c]."""
        return unit(self.image_projection(self.image(images, deterministic=deterministic)))

    def __call__(self, images, input_ids, input_mask, deterministic: bool = True):
        return (self.encode_image(images, deterministic),
                self.encode_text(input_ids, input_mask, deterministic))


def from_config(text, image, projection_dim: int, pipeline=None) -> DualEncoder:
    """The dual encoder of a text tower `config.model` (BERT, or GPT) and an image tower
    `config.image_model` (ViT)."""
    if text.name not in ("bert", "gpt") or image.name != "vit":
        raise ValueError(f"a dual encoder pairs a bert or gpt text tower (model.name) with a vit image tower "
                         f"(image_model.name), not {text.name!r} and {image.name!r}")
    if text.text_pool not in TEXT_POOLS:
        raise ValueError(f"model.text_pool={text.text_pool!r}: expected one of {list(TEXT_POOLS)}")
    if text.text_pool == "eos" and text.eos_id < 0:
        raise ValueError("model.text_pool='eos' needs model.eos_id (the id whose position is pooled)")
    if text.name == "bert":
        tower = bert.from_config(text, pipeline, heads=())
    else:
        tower = gpt.from_config(text, pipeline, features=True)
    return DualEncoder(text=tower, image=vit.from_config(image, pipeline, features=True),
                       projection_dim=projection_dim, cfg=block_config(text, post_norm=True),
                       text_pool=text.text_pool, eos_id=text.eos_id)
