"""GPT: a decoder-only language model on the shared core."""

import flax.linen as nn
import jax.numpy as jnp

from jaxlm.models.layers import BlockConfig, Embed, constrain, dense, norm
from jaxlm.models.transformer import Context, Stack


class GPT(nn.Module):
    vocab_size: int
    max_len: int
    num_layers: int
    cfg: BlockConfig
    tie_embeddings: bool = True
    scan_layers: bool = True
    remat: str = "none"

    @nn.compact
    def __call__(self, tokens, positions=None, deterministic: bool = True, decode: bool = False):
        """Returns logits [batch, length, vocab] (float32) for int tokens [batch, length]."""
        cfg = self.cfg
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        embed = Embed(self.vocab_size, cfg, name="embed")
        x = embed(tokens)
        if cfg.positions == "learned":
            pos_embed = self.param(
                "pos_embedding",
                nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ("length", "embed")),
                (self.max_len, cfg.emb_dim), cfg.param_dtype)
            x = x + jnp.take(pos_embed, positions, axis=0).astype(cfg.dtype)
        batch, length = tokens.shape
        x = nn.Dropout(cfg.dropout)(constrain(x.reshape(batch * length, cfg.emb_dim)),
                                    deterministic=deterministic)
        x = Stack(self.num_layers, scan=self.scan_layers, remat=self.remat,
                  block_kwargs=dict(cfg=cfg, causal=True, max_len=self.max_len),
                  name="decoder")(x, Context(positions), deterministic, decode)
        x = norm(cfg, "final_norm")(x).astype(cfg.dtype)
        if self.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = dense(self.vocab_size, ("embed", "vocab"), cfg, "lm_head")(x)
        logits = nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "vocab"))
        return logits.reshape(batch, length, self.vocab_size)
