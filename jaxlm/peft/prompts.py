"""Soft prompts (Lester et al. 2021) and attention prefixes (Li & Liang 2021).

Prompt tuning puts `num_tokens` learned vectors before an encoder stack's input; the real tokens
keep their positions and the stack's output drops the prompt again, so heads see the usual
shape. Prefix tuning gives every self-attention layer `num_tokens` learned keys and values that
all queries may attend to.
"""

import flax.linen as nn
import jax.numpy as jnp

from jaxlm.models import attach
from jaxlm.models.layers import Attention
from jaxlm.models.transformer import Stack


def intercept_stack(peft, next_fun, args, kwargs, context):
    """A bidirectional `Stack` (an encoder) run with the soft prompt before its input."""
    module = context.module
    if not attach.calls(context, Stack, "__call__") or not module.bidirectional:
        return next_fun(*args, **kwargs)
    x, ctx, *rest = args
    cfg = module.block_kwargs["cfg"]
    batch = ctx.positions.shape[0]
    x, ctx = prepend_prompt(module, x, ctx, peft, cfg)
    return drop_prompt(next_fun(x, ctx, *rest, **kwargs), batch, peft, cfg)


def intercept_attention(peft, next_fun, args, kwargs, context):
    """Self-attention's `attend` with the layer's learned prefix keys and values in front."""
    module = context.module
    if not attach.calls(context, Attention, "attend") or module.cross:
        return next_fun(*args, **kwargs)
    q, k, v, bias = args
    if bias is None:  # splash's structured mask: prefix keys need its additive form
        bias = module.mask_bias(kwargs.get("segment_ids"), q.shape[1])
    k, v, bias = prefix_keys_values(module, k, v, bias, peft, module.cfg)
    return next_fun(q, k, v, bias)


def _pad_keys(bias, count: int, pad_queries_of: int = 0):
    """An additive attention bias [.., q, k] widened by `count` leading always-visible keys
    (and queries, when its query axis has `pad_queries_of` entries)."""
    if bias is None:
        return None
    widths = [(0, 0)] * bias.ndim
    if bias.shape[-1] > 1:
        widths[-1] = (count, 0)
    if pad_queries_of and bias.shape[-2] == pad_queries_of:
        widths[-2] = (count, 0)
    return jnp.pad(bias, widths)


def prepend_prompt(module: nn.Module, x, ctx, peft, cfg):
    """x [batch * length, embed] -> [batch * (tokens + length), embed] and the matching context."""
    batch, length = ctx.positions.shape
    prompt = module.param("prompt", nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                                                 (None, "embed")),
                          (peft.num_tokens, cfg.emb_dim), cfg.param_dtype)
    soft = jnp.broadcast_to(prompt.astype(x.dtype), (batch, peft.num_tokens, cfg.emb_dim))
    x = jnp.concatenate([soft, x.reshape(batch, length, cfg.emb_dim)], 1)
    positions = jnp.concatenate([jnp.zeros((batch, peft.num_tokens), ctx.positions.dtype), ctx.positions], 1)
    ctx = ctx.replace(positions=positions, bias=_pad_keys(ctx.bias, peft.num_tokens, length))
    return x.reshape(-1, cfg.emb_dim), ctx


def drop_prompt(x, batch: int, peft, cfg):
    return x.reshape(batch, -1, cfg.emb_dim)[:, peft.num_tokens:].reshape(-1, cfg.emb_dim)


def prefix_keys_values(module: nn.Module, k, v, bias, peft, cfg):
    """k, v [batch, length, heads, head_dim] with the layer's learned prefix in front, and the
    bias widened to match."""
    shape = (peft.num_tokens, cfg.kv_heads, cfg.head_dim)
    init = nn.initializers.normal(cfg.init_std)
    prefix = [module.param(name, nn.with_logical_partitioning(init, (None, "kv_heads", "kv")), shape,
                           cfg.param_dtype) for name in ("prefix_key", "prefix_value")]
    batch = k.shape[0]
    k, v = (jnp.concatenate([jnp.broadcast_to(p.astype(t.dtype), (batch, *shape)), t], 1)
            for p, t in zip(prefix, (k, v)))
    return k, v, _pad_keys(bias, peft.num_tokens)
