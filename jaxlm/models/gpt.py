"""GPT: a decoder-only language model on the shared core."""

import flax.linen as nn
import jax.numpy as jnp

from jaxlm.models.layers import (BlockConfig, Dropout, Embed, block_config, constrain, dense, learned_positions, norm,
                                 padding_bias, sinusoidal_positions)
from jaxlm.models.transformer import Context, Stack, StackConfig, stack_config


class GPT(nn.Module):
    vocab_size: int
    max_len: int
    num_layers: int
    cfg: BlockConfig
    tie_embeddings: bool = True
    scale_embeddings: bool = False  # Gemma: token embeddings times sqrt(emb_dim)
    logit_softcap: float = 0.0  # Gemma 2: logits cap * tanh(logits / cap) (0: off)
    features: bool = False  # the final norm's output [batch, length, embed], no logits (CLIP's text tower)
    causal: bool = True  # False: every position attends to every other (SigLIP's text tower)
    stack: StackConfig = StackConfig()

    @nn.compact
    def __call__(self, tokens, positions=None, deterministic: bool = True, decode: bool = False,
                 key_mask=None, segment_ids=None):
        """Returns logits [batch, length, vocab] (float32) for int tokens [batch, length] (with
        `features`, the final norm's output [batch, length, embed]).

        `key_mask` [batch, keys] (1: a real token) hides padding from attention: the keys of the
        call, or with `decode` those of the whole cache (left-padded prompts of a batch).
        `segment_ids` [batch, length] packs several examples in a row: attention stays inside
        each (pass `positions` counting from 0 in every example)."""
        cfg = self.cfg
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        embed = Embed(self.vocab_size, cfg, self.scale_embeddings, name="embed")
        x = embed(tokens)
        if cfg.positions == "learned":
            x = x + jnp.take(learned_positions(self, self.max_len, cfg), positions, axis=0).astype(cfg.dtype)
        elif cfg.positions == "sinusoidal":
            x = x + sinusoidal_positions(positions, cfg.emb_dim, x.dtype)
        batch, length = tokens.shape
        x = Dropout(cfg.dropout)(constrain(x.reshape(batch * length, cfg.emb_dim)),
                                    deterministic=deterministic)
        bias = None if key_mask is None else padding_bias(key_mask)
        x = Stack(self.num_layers, self.stack, block_kwargs=dict(cfg=cfg, causal=self.causal, max_len=self.max_len),
                  name="decoder")(x, Context(positions, bias, segment_ids=segment_ids), deterministic, decode)
        x = norm(cfg, "final_norm")(x).astype(cfg.dtype)
        if self.features:
            return x.reshape(batch, length, cfg.emb_dim)
        if self.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = dense(self.vocab_size, ("embed", "vocab"), cfg, "lm_head", use_bias=False)(x)
        logits = logits.astype(jnp.float32)
        if self.logit_softcap:
            logits = self.logit_softcap * jnp.tanh(logits / self.logit_softcap)
        logits = nn.with_logical_constraint(logits, ("batch", "vocab"))
        return logits.reshape(batch, length, self.vocab_size)


def from_config(m, pipeline=None, features: bool = False) -> GPT:
    """The GPT of `config.model` (`m`); with `features`, without the output layer (a text tower)."""
    if m.vocab_size <= 0:
        raise ValueError("model.vocab_size must be set (the trainer takes it from the tokenizer)")
    return GPT(vocab_size=m.vocab_size, max_len=m.max_len, num_layers=m.num_layers, cfg=block_config(m),
               tie_embeddings=m.tie_embeddings, scale_embeddings=m.scale_embeddings, logit_softcap=m.logit_softcap,
               features=features, causal=m.causal, stack=stack_config(m, pipeline))
