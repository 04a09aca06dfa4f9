"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020): h + up(gelu(down(h))) on a
residual branch's output. `up` starts at zero, so a new adapter is the identity."""

import flax.linen as nn
import jax.numpy as jnp

from jaxlm.models import attach
from jaxlm.models.transformer import Block


def intercept(peft, next_fun, args, kwargs, context):
    """`Block.branch_output` followed by the branch's adapter (`adapter_attn`, `adapter_mlp`)."""
    h = next_fun(*args, **kwargs)
    if not attach.calls(context, Block, "branch_output"):
        return h
    branch = args[0]
    if not peft.adapter_applies(branch):
        return h
    return Adapter(peft.adapter_dim, context.module.cfg, name=f"adapter_{branch}")(h)


class Adapter(nn.Module):
    dim: int
    cfg: "object"  # the layer's BlockConfig (dtypes, init scale)

    @nn.compact
    def __call__(self, h):
        cfg, width = self.cfg, h.shape[-1]
        param = lambda name, init, shape, axes: self.param(
            name, nn.with_logical_partitioning(init, axes), shape, cfg.param_dtype).astype(cfg.dtype)
        down = param("down", nn.initializers.normal(cfg.init_std), (width, self.dim), ("embed", None))
        down_bias = param("down_bias", nn.initializers.zeros, (self.dim,), (None,))
        up = param("up", nn.initializers.zeros, (self.dim, width), (None, "embed"))
        up_bias = param("up_bias", nn.initializers.zeros, (width,), ("norm",))
        z = nn.gelu(jnp.dot(h.astype(cfg.dtype), down) + down_bias)
        return h + (jnp.dot(z, up) + up_bias).astype(h.dtype)
