"""Task heads on an encoder's output: a dropout and a linear layer per head.

A head is (name, source, outputs): `source` 'pooled' reads the encoder's pooled [CLS] vector
(sequence classification), 'hidden' every token (token classification). Heads are new
parameters named after the task, which is how fine-tuning knows they start fresh and train; so
they also stay float under quantization (`float_head`): they train with QLoRA and are tiny.
"""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from jaxlm.compress import quantize
from jaxlm.models.layers import BlockConfig, dense

SOURCES = ("pooled", "hidden")


def apply(out: dict, heads: tuple, cfg: BlockConfig, deterministic: bool) -> dict:
    """`out` plus `out[name]` = float32 logits of each head (called inside a compact method)."""
    for name, source, outputs in heads:
        if source not in SOURCES:
            raise ValueError(f"head {name!r}: source {source!r} is not one of {SOURCES}")
        x = nn.Dropout(cfg.dropout)(out[source], deterministic=deterministic)
        out[name] = dense(outputs, ("embed", None), float_head(cfg), name, use_bias=True)(x).astype(jnp.float32)
    return out


def float_head(cfg: BlockConfig) -> BlockConfig:
    """`cfg` for a task head: never quantized."""
    return dataclasses.replace(cfg, quant=quantize.Quant())
