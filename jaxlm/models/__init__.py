"""Model families on the shared core; `get(config.model)` builds the Linen module."""

import math

import jax.numpy as jnp
import ml_collections

from jaxlm.models.gpt import GPT
from jaxlm.models.layers import BlockConfig

FAMILIES = {"gpt": GPT}


def block_config(m: ml_collections.ConfigDict) -> BlockConfig:
    if m.emb_dim % m.num_heads and not m.head_dim:
        raise ValueError(f"model.emb_dim={m.emb_dim} is not divisible by model.num_heads={m.num_heads}")
    return BlockConfig(
        emb_dim=m.emb_dim,
        num_heads=m.num_heads,
        head_dim=m.head_dim or m.emb_dim // m.num_heads,
        mlp_dim=m.mlp_dim or 4 * m.emb_dim,
        mlp=m.mlp,
        norm=m.norm,
        norm_eps=m.norm_eps,
        positions=m.positions,
        rope_theta=m.rope_theta,
        dropout=m.dropout,
        use_bias=m.use_bias,
        dtype=jnp.dtype(m.dtype),
        param_dtype=jnp.dtype(m.param_dtype),
        init_std=m.init_std,
        out_init_std=m.init_std / math.sqrt(2 * m.num_layers),
    )


def get(m: ml_collections.ConfigDict):
    """Builds the model named by `m.name` (`m.vocab_size` must be set)."""
    if m.name not in FAMILIES:
        raise ValueError(f"model.name={m.name!r}: expected one of {sorted(FAMILIES)}")
    if m.vocab_size <= 0:
        raise ValueError("model.vocab_size must be set (the trainer takes it from the tokenizer)")
    if m.positions not in ("learned", "rotary"):
        raise ValueError(f"model.positions={m.positions!r}: expected 'learned' or 'rotary'")
    return FAMILIES[m.name](
        vocab_size=m.vocab_size,
        max_len=m.max_len,
        num_layers=m.num_layers,
        cfg=block_config(m),
        tie_embeddings=m.tie_embeddings,
        scan_layers=m.scan_layers,
        remat=m.remat,
    )
