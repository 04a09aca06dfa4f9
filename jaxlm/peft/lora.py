"""LoRA: a Dense layer's output gains (alpha / rank) * (x @ A) @ B, with B starting at zero.

`intercept` adds `delta` to `Dense.project` of the layers `peft.targets` names (before the
bias). `merge` folds the update into the kernels (a plain model for serving, no extra matmuls);
`unmerge` takes it out.
"""

import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm import tree
from jaxlm.models import attach
from jaxlm.models.layers import Dense, dropout


def intercept(peft, next_fun, args, kwargs, context):
    """`Dense.project` plus the low-rank update where `peft.targets` names the layer."""
    y = next_fun(*args, **kwargs)
    module = context.module
    if not attach.calls(context, Dense, "project") or not peft.lora_applies(module.path):
        return y
    x = args[0]
    return y + delta(module, x, module.contracted_axes(x), module.features, module.axes, peft, module.cfg)


def delta(module: nn.Module, x, in_axes: tuple[int, ...], features: tuple[int, ...], axes, peft, cfg):
    """The low-rank update of `module`'s output for input `x` (contracted over `in_axes`).

    Dropout on the adapter input runs when the call has a dropout rng (training).
    """
    in_dims = tuple(x.shape[a] for a in in_axes)
    fan_in = math.prod(in_dims)
    a = module.param("lora_a", nn.with_logical_partitioning(nn.initializers.normal(1 / math.sqrt(fan_in)),
                                                            tuple(axes[:len(in_dims)]) + (None,)),
                     in_dims + (peft.rank,), cfg.param_dtype)
    b = module.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros,
                                                            (None,) + tuple(axes[len(in_dims):])),
                     (peft.rank,) + features, cfg.param_dtype)
    h = x.astype(cfg.dtype)
    if peft.dropout > 0 and module.has_rng("dropout"):
        h = dropout(h, peft.dropout, module.make_rng("dropout"))
    contract = ((in_axes, tuple(range(len(in_axes)))), ((), ()))
    low = jax.lax.dot_general(h, a.astype(cfg.dtype), contract)
    up = jax.lax.dot_general(low, b.astype(cfg.dtype), (((low.ndim - 1,), (0,)), ((), ())))
    return up * (peft.alpha / peft.rank)


def _update(kernel, a, b, scale):
    """scale * A @ B shaped like `kernel`, for stacked (scanned) layers too."""
    lead = a.ndim + b.ndim - 2 - kernel.ndim  # leading layer axes shared by kernel, a and b
    rank = a.shape[-1]
    a2 = a.reshape(a.shape[:lead] + (-1, rank)).astype(jnp.float32)
    b2 = b.reshape(b.shape[:lead] + (rank, -1)).astype(jnp.float32)
    return (scale * (a2 @ b2)).reshape(kernel.shape)


def _walk(params, peft, sign: float, keep_lora: bool):
    def visit(node):
        if not isinstance(node, dict):
            return node
        node = {k: visit(v) for k, v in node.items()}
        if "lora_a" in node and "kernel" in node:
            kernel = node["kernel"]
            update = _update(kernel, node["lora_a"], node["lora_b"], peft.alpha / peft.rank)
            node["kernel"] = (kernel.astype(jnp.float32) + sign * update).astype(kernel.dtype)
            if not keep_lora:
                node.pop("lora_a"), node.pop("lora_b")
        return node
    return visit(flax.core.unfreeze(params))


def merge(params, peft) -> dict:
    """Parameters of the plain model (peft.method='full'): every kernel with its LoRA update
    added and the `lora_a`/`lora_b` leaves removed."""
    return _walk(params, peft, +1.0, keep_lora=False)


def unmerge(merged, lora_params, peft) -> dict:
    """Undoes `merge`: `lora_params` (a tree holding the `lora_a`/`lora_b` leaves, e.g. the PEFT
    checkpoint's trainable parameters) are put back and their update subtracted."""
    return _walk(tree.join(lora_params, merged), peft, -1.0, keep_lora=True)
