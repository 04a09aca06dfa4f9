"""T5: a pre-norm (RMSNorm) encoder-decoder with relative position biases and cross-attention.

With `positions="sinusoidal"` both stacks' inputs also carry the fixed absolute position code of
Vaswani et al. (as `torch.nn.Transformer` models do): relative biases alone tell the decoder
nothing of where it is in the source, which cross-attention has no bias for.

`encode` and `decode` are separate methods so that generation encodes once and then decodes
token by token with a KV cache (`decode=True`).
"""

import flax.linen as nn
import jax.numpy as jnp

from jaxlm.models.layers import (BlockConfig, Dropout, Embed, RelativePositionBias, block_config, dense, norm, padding_bias,
                                 sinusoidal_positions)
from jaxlm.models.transformer import Context, Stack, StackConfig, stack_config


class T5(nn.Module):
    vocab_size: int
    max_len: int  # decoder positions a KV cache holds
    num_layers: int
    num_decoder_layers: int
    cfg: BlockConfig
    relative_buckets: int = 32
    relative_max_distance: int = 128
    tie_embeddings: bool = True
    scale_embeddings: bool = False  # token embeddings times sqrt(emb_dim) (see layers.Embed)
    stack: StackConfig = StackConfig()

    def setup(self):
        cfg = self.cfg
        self.embed = Embed(self.vocab_size, cfg, self.scale_embeddings)
        self.encoder_bias = RelativePositionBias(self.relative_buckets, self.relative_max_distance,
                                                 True, cfg)
        self.encoder = Stack(self.num_layers, self.stack, block_kwargs=dict(cfg=cfg, causal=False))
        self.encoder_norm = norm(cfg)
        self.decoder_bias = RelativePositionBias(self.relative_buckets, self.relative_max_distance,
                                                 False, cfg)
        self.decoder = Stack(self.num_decoder_layers, self.stack,
                             block_kwargs=dict(cfg=cfg, causal=True, cross=True, max_len=self.max_len))
        self.decoder_norm = norm(cfg)
        self.dropout = Dropout(cfg.dropout)
        if not self.tie_embeddings:
            self.lm_head = dense(self.vocab_size, ("embed", "vocab"), cfg)

    def _embed(self, tokens, positions):
        x = self.embed(tokens)
        if self.cfg.positions == "sinusoidal":
            x = x + sinusoidal_positions(positions, self.cfg.emb_dim, x.dtype)
        return x

    def encode(self, tokens, mask=None, deterministic: bool = True):
        """Flat encoder output [batch * length, embed] for int tokens [batch, length]."""
        batch, length = tokens.shape
        mask = tokens > 0 if mask is None else mask
        positions = jnp.arange(length)
        bias = self.encoder_bias(positions, positions) + padding_bias(mask)
        ctx = Context(jnp.broadcast_to(positions, tokens.shape), bias=bias)
        x = self.dropout(self._embed(tokens, ctx.positions).reshape(batch * length, -1), deterministic=deterministic)
        x = self.encoder(x, ctx, deterministic)
        return self.dropout(self.encoder_norm(x).astype(self.cfg.dtype), deterministic=deterministic)

    def decode(self, encoded, encoder_mask, tokens, positions=None, deterministic: bool = True,
               decode: bool = False):
        """Logits [batch, length, vocab] (float32) of decoder tokens [batch, length] attending to
        `encoded` (from `encode`) where `encoder_mask` [batch, source_length] is true."""
        cfg = self.cfg
        batch, length = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length), tokens.shape)
        keys = jnp.arange(self.max_len if decode else length)
        ctx = Context(positions, bias=self.decoder_bias(positions[0], keys), memory=encoded,
                      memory_bias=padding_bias(encoder_mask))
        x = self.dropout(self._embed(tokens, positions).reshape(batch * length, -1), deterministic=deterministic)
        x = self.decoder(x, ctx, deterministic, decode)
        x = self.dropout(self.decoder_norm(x).astype(cfg.dtype), deterministic=deterministic)
        if self.tie_embeddings:  # Mesh TensorFlow T5 rescales before the tied output layer
            logits = self.embed.attend(x * cfg.emb_dim ** -0.5)
        else:
            logits = self.lm_head(x)
        logits = nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "vocab"))
        return logits.reshape(batch, length, self.vocab_size)

    def __call__(self, encoder_tokens, decoder_tokens, encoder_mask=None, deterministic: bool = True):
        encoder_mask = encoder_tokens > 0 if encoder_mask is None else encoder_mask
        encoded = self.encode(encoder_tokens, encoder_mask, deterministic)
        return self.decode(encoded, encoder_mask, decoder_tokens, deterministic=deterministic)


def from_config(m, pipeline=None) -> T5:
    if m.vocab_size <= 0:
        raise ValueError("model.vocab_size must be set (the trainer takes it from the tokenizer)")
    return T5(vocab_size=m.vocab_size, max_len=m.max_len, num_layers=m.num_layers,
              num_decoder_layers=m.num_decoder_layers or m.num_layers,
              cfg=block_config(m), relative_buckets=m.relative_buckets,
              relative_max_distance=m.relative_max_distance, tie_embeddings=m.tie_embeddings,
              scale_embeddings=m.scale_embeddings, stack=stack_config(m, pipeline))
