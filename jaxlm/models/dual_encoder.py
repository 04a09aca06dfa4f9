"""A dual encoder (CLIP, SigLIP): an image tower (ViT) and a text tower (BERT, or GPT as CLIP's)
from the one core, each pooled, projected to a shared space and L2-normalised.

Parameters: `text/` (the BERT, or the GPT without its output layer), `image/` (the ViT without a
head), `text_projection`, `image_projection` ([tower width, projection_dim], no bias, as CLIP's;
with `task.projection_bias` a bias too, as SigLIP's text head; without `task.image_projection`
none for the image: SigLIP's attention-pooled image features are its embedding).
The text tower pools (`model.text_pool`) the mean of its last hidden states over the real tokens
(as sentence-transformers' MiniLM does), or, for CLIP's causal tower, the state at the first
`model.eos_id` (`eos`) or at the largest id of the row (`max_id`: CLIP configs older than
transformers' PR #24773, whose EOS is the largest id, pool so), or, for SigLIP's bidirectional
tower, the state at the last position of the row padded to its full length (`last`: every
position attends to every other, padding too, as SigLIP trains; `input_mask` is not used); the
image tower its class token (or mean, or attention pooling: `pool`).

The pair logits of unit embeddings are `logit_scale` times their cosine similarities, plus a
learned bias for SigLIP (`pair_logits`).
"""

import flax.linen as nn
import jax.numpy as jnp

from jaxlm.models import bert, gpt, vit
from jaxlm.models.layers import BlockConfig, block_config, dense, mean_pool


def unit(x):
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


TEXT_POOLS = ("mean", "eos", "max_id", "last")
MAX_SCALE = 100.0  # CLIP's clamp of the logit scale (OpenAI's; SigLIP's big_vision does not clamp)


def logit_scale(log_scale, clamp: bool = True):
    """exp(log_scale), float32, at most `MAX_SCALE` with `clamp` (CLIP's loss)."""
    scale = jnp.exp(jnp.asarray(log_scale, jnp.float32))
    return jnp.minimum(scale, MAX_SCALE) if clamp else scale


def pair_logits(images, texts, scale, bias=0.0):
    """[images, texts] logits of unit embeddings: `scale` times the cosine similarities, plus `bias`
    (SigLIP's)."""
    return scale * (images @ texts.T) + bias


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
    projection_bias: bool = False  # SigLIP's text head has one
    project_images: bool = True  # False: the image tower's pooled features are its embedding (SigLIP)

    def setup(self):
        self.text_projection = dense(self.projection_dim, ("embed", None), self.cfg, use_bias=self.projection_bias)
        if self.project_images:
            self.image_projection = dense(self.projection_dim, ("embed", None), self.cfg, use_bias=self.projection_bias)

    def encode_text(self, input_ids, input_mask, deterministic: bool = True):
        """Unit text embeddings float32 [n, projection_dim] of token rows [n, l]."""
        if isinstance(self.text, bert.BERT):
            hidden = self.text(input_ids, input_mask=input_mask, deterministic=deterministic)["hidden"]
        else:  # a GPT: padding hidden from the keys (as transformers' CLIP), except SigLIP's whole row
            key_mask = None if self.text_pool == "last" else input_mask
            hidden = self.text(input_ids, key_mask=key_mask, deterministic=deterministic)
        if self.text_pool == "mean":
            pooled = mean_pool(hidden, input_mask)
        elif self.text_pool == "last":
            pooled = hidden[:, -1].astype(jnp.float32)
        else:
            pooled = token_pool(hidden, input_ids, self.text_pool, self.eos_id)
        return unit(self.text_projection(pooled))

    def encode_image(self, images, deterministic: bool = True):
        """Unit image embeddings float32 [n, projection_dim] of images [n, h, w, c]."""
        pooled = self.image(images, deterministic=deterministic)
        return unit(self.image_projection(pooled) if self.project_images else pooled)

    def __call__(self, images, input_ids, input_mask, deterministic: bool = True):
        return (self.encode_image(images, deterministic),
                self.encode_text(input_ids, input_mask, deterministic))


def from_config(text, image, projection_dim: int, pipeline=None, projection_bias: bool = False,
                image_projection: bool = True) -> DualEncoder:
    """The dual encoder of a text tower `config.model` (BERT, or GPT) and an image tower
    `config.image_model` (ViT); `projection_bias` and `image_projection` as `config.task`'s."""
    if text.name not in ("bert", "gpt") or image.name != "vit":
        raise ValueError(f"a dual encoder pairs a bert or gpt text tower (model.name) with a vit image tower "
                         f"(image_model.name), not {text.name!r} and {image.name!r}")
    if text.text_pool not in TEXT_POOLS:
        raise ValueError(f"model.text_pool={text.text_pool!r}: expected one of {list(TEXT_POOLS)}")
    if text.text_pool == "eos" and text.eos_id < 0:
        raise ValueError("model.text_pool='eos' needs model.eos_id (the id whose position is pooled)")
    if not image_projection and image.emb_dim != projection_dim:
        raise ValueError(f"task.image_projection=False takes the image features as the embedding: "
                         f"task.projection_dim={projection_dim} must be image_model.emb_dim={image.emb_dim}")
    if text.name == "bert":
        tower = bert.from_config(text, pipeline, heads=())
    else:
        tower = gpt.from_config(text, pipeline, features=True)
    return DualEncoder(text=tower, image=vit.from_config(image, pipeline, features=True),
                       projection_dim=projection_dim, cfg=block_config(text, post_norm=True),
                       text_pool=text.text_pool, eos_id=text.eos_id, projection_bias=projection_bias,
                       project_images=image_projection)


def from_run_config(config, pipeline=None, text=None, image=None) -> DualEncoder:
    """The dual encoder of an image_text run `config` (its `model`, `image_model` and `task`), or
    of the towers `text` and `image` in their place."""
    t = config.task
    return from_config(config.model if text is None else text, config.image_model if image is None else image,
                       t.projection_dim, pipeline, projection_bias=t.projection_bias,
                       image_projection=t.image_projection)
