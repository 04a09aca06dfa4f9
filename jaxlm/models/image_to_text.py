"""Image-to-text (captioning, visual question answering): a ViT encoder whose every patch a T5
decoder cross-attends to, both from the one core.

Parameters: `image/` (the ViT without pooling or head), `image_projection` (the ViT's width to
the decoder's, with bias, as PaLI's), `text/` (T5's embedding, decoder stack, decoder relative
position bias and norm: its encoder is never called, so it has no parameters). `encode` and
`decode` have T5's signatures, so `jaxlm.infer.seq2seq_decoding` decodes either model.
"""

import flax.linen as nn
import jax.numpy as jnp

from jaxlm.models import t5, vit
from jaxlm.models.layers import BlockConfig, block_config, dense


class ImageToText(nn.Module):
    image: vit.ViT  # with tokens=True
    text: t5.T5
    cfg: BlockConfig  # the projection's numerics and initialisation (the decoder's)

    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size

    @property
    def max_len(self) -> int:
        return self.text.max_len

    def setup(self):
        self.image_projection = dense(self.cfg.emb_dim, (None, "embed"), self.cfg, use_bias=True)

    def encode(self, images, mask=None, deterministic: bool = True):
        """Flat features [batch * positions, embed] of images [batch, h, w, c] (every position
        is real: `mask` is taken for T5's signature only)."""
        del mask
        x = self.image_projection(self.image(images, deterministic=deterministic))
        return x.reshape(-1, x.shape[-1]).astype(self.cfg.dtype)

    def decode(self, encoded, encoder_mask, tokens, positions=None, deterministic: bool = True,
               decode: bool = False):
        """Logits [batch, length, vocab] (float32) of decoder tokens attending to `encoded`."""
        return self.text.decode(encoded, encoder_mask, tokens, positions, deterministic, decode)

    def __call__(self, images, decoder_tokens, deterministic: bool = True):
        encoded = self.encode(images, deterministic=deterministic)
        mask = jnp.ones((images.shape[0], encoded.shape[0] // images.shape[0]), bool)
        return self.decode(encoded, mask, decoder_tokens, deterministic=deterministic)


def positions(image) -> int:
    """The encoder positions of `config.image_model` (`image`): patches, and the class token."""
    return (image.image_size // image.patch_size) ** 2 + (image.pool == "cls")


def from_config(text, image, pipeline=None) -> ImageToText:
    """The model of a T5 decoder `config.model` and a ViT encoder `config.image_model`."""
    if text.name != "t5" or image.name != "vit":
        raise ValueError(f"image-to-text pairs a vit encoder (image_model.name) with a t5 decoder (model.name), "
                         f"not {image.name!r} and {text.name!r}")
    return ImageToText(image=vit.from_config(image, pipeline, tokens=True), text=t5.from_config(text, pipeline),
                       cfg=block_config(text))
