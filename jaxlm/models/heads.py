"""Task heads on an encoder's output: a dropout and a linear layer per head.

A head is (name, source, outputs): `source` 'pooled' reads the encoder's pooled vector
(sequence classification; `model.pool`), 'hidden' every token (token classification). Heads are new
parameters named after the task, which is how fine-tuning knows they start fresh and train.
Heads are `Head` layers, which quantization leaves float: they train with QLoRA and are tiny.
"""

import jax.numpy as jnp

from jaxlm.models.layers import BlockConfig, Dense, Dropout

SOURCES = ("pooled", "hidden")


def apply(out: dict, heads: tuple, cfg: BlockConfig, deterministic: bool) -> dict:
    """`out` plus `out[name]` = float32 logits of each head (called inside a compact method)."""
    for name, source, outputs in heads:
        if source not in SOURCES:
            raise ValueError(f"head {name!r}: source {source!r} is not one of {SOURCES}")
        x = Dropout(cfg.dropout)(out[source], deterministic=deterministic)
        out[name] = head(outputs, cfg, name)(x).astype(jnp.float32)
    return out


class Head(Dense):
    """A task head's linear layer (a `Dense` that is never quantized)."""


def head(outputs: int, cfg: BlockConfig, name: str) -> Head:
    """A head from pooled or per-token [.., embed] activations to `outputs` logits, with a bias."""
    return Head((outputs,), ("embed", None), cfg, use_bias=True, name=name)
