"""The shared Transformer building blocks: every family (GPT, BERT, T5, ViT) uses these.

Every parameter carries logical axis names (`vocab`, `embed`, `heads`, `kv`, `mlp`, `norm`) and
every large activation is constrained with (`batch`, ...) names; the mesh rules in the config turn
them into shardings, so parallelism never touches this file.

Between attention calls activations are kept flat, [batch * length, embed]: every projection is
then a plain 2-D matmul. XLA:CPU turns [batch, length, embed] @ [embed, n] into batched dots with
layout copies, measured 1.7x slower for a whole train step on CPU.
Only attention sees [batch, length, heads, head_dim].
"""

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.models import splash


Array = jax.Array
DType = Any

ACTIVATION_AXES = ("batch", "embed")  # flat activations [batch * length, embed]
# The residual stream and the branch outputs added to it: like ACTIVATION_AXES, except that
# `mesh.sequence_parallel` also shards its tokens over `tensor` (the branch all-reduce becomes a
# reduce-scatter, and norms and dropout run on a tensor-shard of the tokens).
RESIDUAL_AXES = ("residual", "embed")


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """The model shape and numerics shared by every layer (built from `config.model`)."""

    emb_dim: int
    num_heads: int
    head_dim: int
    mlp_dim: int
    num_kv_heads: int = 0  # grouped-query attention: key/value heads (0: num_heads)
    mlp: str = "gelu"
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    positions: str = "learned"
    rope_theta: float = 10000.0
    rope_scaling: "RopeScaling" = None
    sliding_window: int = 0  # Mistral: each query sees the last N keys (0: all)
    qkv_bias: bool = False  # Qwen2: biases on the query, key and value projections only
    qk_norm: bool = False  # Qwen3: RMSNorm of each query and key head before rotary
    attn_softcap: float = 0.0  # Gemma 2: attention logits cap * tanh(logits / cap) (0: off)
    query_pre_attn_scalar: float = 0.0  # Gemma 2/3: queries times its -1/2 power (0: head_dim's)
    post_branch_norm: bool = False  # Gemma 2/3: normalize each branch's output before the residual add
    sliding_window_pattern: int = 0  # Gemma 2 (2), 3 (6): every Nth layer global, the rest local
    local_rope_theta: float = 0.0  # Gemma 3: rotary base of the local layers, unscaled (0: rope_theta)
    attention: str = "auto"  # auto | cpu | xla | cudnn | splash (see `attention_implementation`)
    dropout: float = 0.0
    use_bias: bool = False
    post_norm: bool = False  # BERT: normalize after each residual add instead of before the branch
    scale_queries: bool = True  # False (T5): 1/sqrt(head_dim) is in the query kernel's init instead
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    init_std: float = 0.02
    out_init_std: float = 0.02  # residual projections (GPT-2 scales them by 1/sqrt(2 * layers))
    embed_init_std: float = 0.02  # token embeddings

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """How rotary frequencies are stretched for long contexts (`model.rope_scaling`).

    none: theta^(-2i/d). linear: every frequency / factor (positions interpolated). llama3:
    Llama 3.1's: wavelengths shorter than original_max_len / high_freq_factor keep their
    frequency, those longer than original_max_len / low_freq_factor are divided by factor, and
    the band between is interpolated.
    """

    type: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_len: int = 8192

    def __post_init__(self):
        if self.type not in ("none", "linear", "llama3"):
            raise ValueError(f"model.rope_scaling.type={self.type!r}: expected none | linear | llama3")


def block_config(m, **overrides) -> BlockConfig:
    """The BlockConfig of `config.model` (`m`), with family-specific `overrides`."""
    if m.emb_dim % m.num_heads and not m.head_dim:
        raise ValueError(f"model.emb_dim={m.emb_dim} is not divisible by model.num_heads={m.num_heads}")
    if m.num_kv_heads and m.num_heads % m.num_kv_heads:
        raise ValueError(f"model.num_heads={m.num_heads} is not a multiple of model.num_kv_heads={m.num_kv_heads}")
    values = dict(
        emb_dim=m.emb_dim,
        num_heads=m.num_heads,
        head_dim=m.head_dim or m.emb_dim // m.num_heads,
        mlp_dim=m.mlp_dim or 4 * m.emb_dim,
        mlp=m.mlp,
        norm=m.norm,
        norm_eps=m.norm_eps,
        positions=m.positions,
        rope_theta=m.rope_theta,
        rope_scaling=RopeScaling(**m.rope_scaling.to_dict()),
        num_kv_heads=m.num_kv_heads,
        sliding_window=m.sliding_window,
        qkv_bias=m.qkv_bias,
        qk_norm=m.qk_norm,
        attn_softcap=m.attn_softcap,
        query_pre_attn_scalar=m.query_pre_attn_scalar,
        post_branch_norm=m.post_branch_norm,
        sliding_window_pattern=m.sliding_window_pattern,
        local_rope_theta=m.local_rope_theta,
        attention=m.attention,
        scale_queries=m.scale_queries,
        dropout=m.dropout,
        use_bias=m.use_bias,
        dtype=jnp.dtype(m.dtype),
        param_dtype=jnp.dtype(m.param_dtype),
        init_std=m.init_std,
        out_init_std=m.init_std / math.sqrt(2 * m.num_layers),
        embed_init_std=m.embed_init_std or m.init_std,
    )
    return BlockConfig(**{**values, **overrides})


def layer_config(cfg: BlockConfig, index: int) -> BlockConfig:
    """Layer `index`'s config where local and global layers alternate (`sliding_window_pattern`
    N, Gemma 2 and 3): layers N-1, 2N-1, ... attend to every key with `rope_theta` and
    `rope_scaling`; the others see the last `sliding_window` keys, with `local_rope_theta` and
    no scaling when it is set."""
    if not cfg.sliding_window_pattern:
        return cfg
    if (index + 1) % cfg.sliding_window_pattern == 0:
        return dataclasses.replace(cfg, sliding_window=0, sliding_window_pattern=0)
    if cfg.local_rope_theta:
        return dataclasses.replace(cfg, sliding_window_pattern=0, rope_theta=cfg.local_rope_theta,
                                   rope_scaling=RopeScaling())
    return dataclasses.replace(cfg, sliding_window_pattern=0)


def learned_positions(module: nn.Module, length: int, cfg: BlockConfig, name="pos_embedding"):
    """A learned position table [length, embed] owned by `module`."""
    return module.param(name, nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                                           ("length", "embed")),
                        (length, cfg.emb_dim), cfg.param_dtype)


def sinusoidal_positions(positions: Array, width: int, dtype) -> Array:
    """The fixed position code of Vaswani et al. [..., width] for int `positions` [...]: sines of
    frequencies 10000^(-2i/width) in the even entries, cosines in the odd ones."""
    rates = jnp.exp(-np.log(10000.0) * jnp.arange(0, width, 2) / width)
    angles = positions[..., None].astype(jnp.float32) * rates
    return jnp.stack([jnp.sin(angles), jnp.cos(angles)], -1).reshape(*positions.shape, width).astype(dtype)


def constrain(x: Array, axes: tuple[str, ...] = ACTIVATION_AXES) -> Array:
    return nn.with_logical_constraint(x, axes)


class Dense(nn.Module):
    """y = x @ kernel (+ bias) over input axes `in_axes`; the kernel is [*in_dims, *features].

    `axes` names the kernel's dimensions (inputs, then outputs) for sharding. `project` (the
    product with the kernel, before the bias) is where LoRA and quantization attach.
    """

    features: tuple[int, ...]
    axes: tuple[str, ...]
    cfg: BlockConfig
    in_axes: tuple[int, ...] = (-1,)
    std: float | None = None
    use_bias: bool | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        y = self.project(x)
        if cfg.use_bias if self.use_bias is None else self.use_bias:
            bias = self.param(
                "bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[len(self.in_axes):]),
                self.features, cfg.param_dtype)
            y = y + bias.astype(cfg.dtype)
        return y

    @nn.nowrap
    def contracted_axes(self, x: Array) -> tuple[int, ...]:
        return tuple(a % x.ndim for a in self.in_axes)

    @nn.nowrap
    def kernel_init(self):
        return nn.initializers.normal(self.cfg.init_std if self.std is None else self.std)

    def project(self, x: Array) -> Array:
        """x contracted with the kernel over `in_axes`."""
        cfg, in_axes = self.cfg, self.contracted_axes(x)
        shape = tuple(x.shape[a] for a in in_axes) + self.features
        kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init(), self.axes), shape,
                            cfg.param_dtype)
        contract = ((in_axes, tuple(range(len(in_axes)))), ((), ()))
        return jax.lax.dot_general(x.astype(cfg.dtype), kernel.astype(cfg.dtype), contract)


def dense(features, axes, cfg: BlockConfig, name: str | None = None, in_axis=-1, std=None,
          use_bias=None):
    """A `Dense` to `features` (int or tuple) over `in_axis` (int or tuple)."""
    features = (features,) if isinstance(features, int) else tuple(features)
    in_axes = (in_axis,) if isinstance(in_axis, int) else tuple(in_axis)
    return Dense(features, tuple(axes), cfg, in_axes, std, use_bias, name=name)


def _normalize(x: Array, eps: float):
    centered = x - jnp.mean(x, -1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.mean(centered * centered, -1, keepdims=True) + eps)
    return centered * rstd, rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def layer_norm(x: Array, scale: Array, eps: float) -> Array:
    """(x - mean) / std * scale over the last axis, with the closed-form backward.

    The hand-written gradient saves the normalized input and the inverse std instead of letting
    autodiff replay the reductions: a few percent of a small model's step on CPU.
    """
    return _normalize(x, eps)[0] * scale


def _layer_norm_forward(x, scale, eps):
    normalized, rstd = _normalize(x, eps)
    return normalized * scale, (normalized, rstd, scale)


def _layer_norm_backward(eps, saved, d_out):
    normalized, rstd, scale = saved
    d_scale = jnp.sum(d_out * normalized, axis=tuple(range(d_out.ndim - 1)))
    g = d_out * scale
    d_x = rstd * (g - jnp.mean(g, -1, keepdims=True)
                  - normalized * jnp.mean(g * normalized, -1, keepdims=True))
    return d_x, d_scale


layer_norm.defvjp(_layer_norm_forward, _layer_norm_backward)


class LayerNorm(nn.Module):
    """LayerNorm in float32 (parameters `scale` and, with `use_bias`, `bias`, as in Flax)."""

    cfg: BlockConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg, features = self.cfg, x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (features,), cfg.param_dtype)
        y = layer_norm(x.astype(jnp.float32), scale.astype(jnp.float32), cfg.norm_eps)
        if cfg.use_bias:
            y = y + self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                               (features,), cfg.param_dtype).astype(jnp.float32)
        return y


class RMSNorm(nn.Module):
    """x / rms(x) * scale in float32 over the last axis; with `plus_one` the stored scale is
    zero-centred, x / rms(x) * (1 + scale) (Gemma)."""

    cfg: BlockConfig
    plus_one: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
        scale = self.param("scale", nn.with_logical_partitioning(init, ("norm",)), (x.shape[-1],),
                           self.cfg.param_dtype).astype(jnp.float32)
        x = x.astype(jnp.float32)
        y = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + self.cfg.norm_eps)
        return y * (1 + scale) if self.plus_one else y * scale


NORMS = ("layernorm", "rmsnorm", "rmsnorm_plus_one")


def norm(cfg: BlockConfig, name: str | None = None) -> nn.Module:
    if cfg.norm == "layernorm":
        return LayerNorm(cfg, name=name)
    if cfg.norm in ("rmsnorm", "rmsnorm_plus_one"):
        return RMSNorm(cfg, cfg.norm == "rmsnorm_plus_one", name=name)
    raise ValueError(f"model.norm={cfg.norm!r}: expected one of {NORMS}")


def dropout(x: Array, rate: float, rng: Array) -> Array:
    """Inverted dropout whose mask takes 8 random bits per element, four from each 32-bit word of
    the generator: on CPU the mask costs about a quarter of a float per element
    (`jax.random.bernoulli`, flax's `nn.Dropout`), measured 3.7x faster and 22% of a T5 train step.
    The rate is taken to the nearest 1/256 (0.1 drops 26/256 = 0.1016) and the kept values are
    scaled by the exact keep probability, so the expectation is unchanged."""
    drop = round(rate * 256)
    if drop == 0:
        return x
    if drop == 256:
        return jnp.zeros_like(x)
    *lead, last = x.shape
    words = jax.random.bits(rng, (*lead, -(-last // 4)), jnp.uint32)
    draws = jax.lax.bitcast_convert_type(words, jnp.uint8).reshape(*lead, -1)[..., :last]
    return jnp.where(draws >= drop, x / (1 - drop / 256), 0).astype(x.dtype)


class Dropout(nn.Module):
    """`dropout` as a module with flax's `nn.Dropout` call: the rng is the `dropout` collection."""

    rate: float

    def __call__(self, x: Array, deterministic: bool) -> Array:
        if deterministic or self.rate <= 0:
            return x
        return dropout(x, self.rate, self.make_rng("dropout"))


class Embed(nn.Module):
    """Token embedding; `attend` gives logits against the same table (tied output).

    With `scale` the vectors are multiplied by sqrt(emb_dim) (Vaswani et al., Gemma): with Adam,
    whose steps are about lr per entry, small-initialised embeddings then learn sqrt(emb_dim) times
    faster relative to their size."""

    vocab_size: int
    cfg: BlockConfig
    scale: bool = False

    def setup(self):
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(nn.initializers.normal(self.cfg.embed_init_std),
                                                      ("vocab", "embed")),
            (self.vocab_size, self.cfg.emb_dim), self.cfg.param_dtype)

    def __call__(self, ids: Array) -> Array:
        x = jnp.take(self.embedding, ids, axis=0).astype(self.cfg.dtype)
        return x * jnp.asarray(self.cfg.emb_dim ** 0.5, x.dtype) if self.scale else x

    def attend(self, x: Array) -> Array:
        """Logits [..., vocab] of activations [..., embed] against the embedding table."""
        return jnp.einsum("...d,vd->...v", x, self.embedding.astype(self.cfg.dtype))


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """The rotary angular frequency of each of the head_dim / 2 rotated pairs."""
    half = head_dim // 2
    freq = theta ** (-np.arange(half, dtype=np.float64) / half)
    scaling = scaling or RopeScaling()
    if scaling.type == "linear":
        return freq / scaling.factor
    if scaling.type == "llama3":
        wavelength = 2 * np.pi / freq
        long_wave = scaling.original_max_len / scaling.low_freq_factor
        short_wave = scaling.original_max_len / scaling.high_freq_factor
        smooth = ((scaling.original_max_len / wavelength - scaling.low_freq_factor)
                  / (scaling.high_freq_factor - scaling.low_freq_factor))
        between = (1 - smooth) * freq / scaling.factor + smooth * freq
        return np.where(wavelength > long_wave, freq / scaling.factor,
                        np.where(wavelength < short_wave, freq, between))
    return freq


def rotary(x: Array, positions: Array, theta: float, scaling: RopeScaling | None = None) -> Array:
    """Rotary position embedding on [batch, length, heads, head_dim] (halves rotated)."""
    freq = jnp.asarray(rope_frequencies(x.shape[-1], theta, scaling), jnp.float32)
    angle = positions[..., None].astype(jnp.float32) * freq  # [batch, length, half]
    sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def _attention_forward(q, k, v, bias):
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) + bias
    scores = scores - jnp.max(scores, -1, keepdims=True)
    probs = jnp.exp(scores)
    probs = (probs / jnp.sum(probs, -1, keepdims=True)).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return out, (q, k, v, probs, out, bias.shape)


@jax.custom_vjp
def attention(q: Array, k: Array, v: Array, bias: Array) -> Array:
    """softmax(q k^T + bias) v over [batch, length, heads, head_dim]; q comes pre-scaled.

    `bias` broadcasts to [batch, heads, q_len, k_len]: 0 where attending, -1e30 where masked, or
    a learned position bias. The hand-written backward reuses the saved probabilities (no
    recomputed softmax, no select on the mask), about 5-10% of a small model's train step on CPU.
    """
    return _attention_forward(q, k, v, bias)[0]


def _attention_backward(saved, d_out):
    q, k, v, probs, out, bias_shape = saved
    d_v = jnp.einsum("bhqk,bqhd->bkhd", probs, d_out)
    d_probs = jnp.einsum("bqhd,bkhd->bhqk", d_out, v)
    row = jnp.einsum("bqhd,bqhd->bhq", d_out, out)[..., None]
    d_scores = (probs * (d_probs - row)).astype(jnp.float32)
    d_q = jnp.einsum("bhqk,bkhd->bqhd", d_scores.astype(q.dtype), k)
    d_k = jnp.einsum("bhqk,bqhd->bkhd", d_scores.astype(q.dtype), q)
    summed = tuple(i for i, n in enumerate(bias_shape) if n == 1)
    d_bias = jnp.sum(d_scores, summed, keepdims=True) if summed else d_scores
    return d_q, d_k, d_v, d_bias


attention.defvjp(_attention_forward, _attention_backward)

MASKED = -1e30
ATTENTION_IMPLEMENTATIONS = ("auto", "cpu", "xla", "cudnn", "splash")


def repeat_kv_heads(x: Array, num_heads: int) -> Array:
    """Keys or values [batch, length, kv_heads, head_dim] with each head repeated for the
    num_heads / kv_heads query heads of its group (grouped-query attention)."""
    return x if x.shape[2] == num_heads else jnp.repeat(x, num_heads // x.shape[2], axis=2)


def attention_implementation(name: str, dtype) -> str:
    """The attention that `model.attention` = `name` runs on this backend: `auto` is the Pallas
    splash kernel on TPU (where it applies: `Attention` falls back to XLA's), cuDNN's fused kernel
    on GPU for 16-bit activations, XLA's `dot_product_attention` elsewhere on accelerators, and
    jaxlm's custom-gradient `attention` on CPU."""
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"model.attention={name!r}: expected one of {ATTENTION_IMPLEMENTATIONS}")
    if name != "auto":
        return name
    backend = jax.default_backend()
    if backend in ("cpu", "tpu"):
        return {"cpu": "cpu", "tpu": "splash"}[backend]
    return "cudnn" if backend == "gpu" and jnp.dtype(dtype).itemsize == 2 else "xla"


def softcapped_attention(q: Array, k: Array, v: Array, bias: Array, cap: float) -> Array:
    """softmax(cap * tanh(q k^T / cap) + bias) v (Gemma 2's capped logits), by autodiff: no fused
    kernel but splash takes a cap."""
    heads = q.shape[2]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, repeat_kv_heads(k, heads)).astype(jnp.float32)
    probs = jax.nn.softmax(cap * jnp.tanh(scores / cap) + bias, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, repeat_kv_heads(v, heads))


def dot_product_attention(q: Array, k: Array, v: Array, bias: Array, implementation: str,
                          softcap: float = 0.0) -> Array:
    """softmax(q k^T + bias) v for pre-scaled queries [batch, q_len, heads, head_dim] and keys and
    values with heads or fewer (grouped) heads; `implementation` as `attention_implementation`
    (splash takes masks as structure, not a bias: `Attention` calls it; a bias goes to XLA's)."""
    implementation = attention_implementation(implementation, q.dtype)
    if softcap:
        return softcapped_attention(q, k, v, bias, softcap)
    if implementation == "splash":
        implementation = "xla"
    if implementation == "cpu":
        return attention(q, repeat_kv_heads(k, q.shape[2]), repeat_kv_heads(v, q.shape[2]), bias)
    bias = jnp.broadcast_to(bias, (q.shape[0], bias.shape[1], q.shape[1], k.shape[1]))
    bias = jnp.maximum(bias, jnp.finfo(q.dtype).min)  # the mask stays finite in 16 bits
    return jax.nn.dot_product_attention(q, k, v, bias=bias.astype(q.dtype), scale=1.0,
                                        implementation=implementation)


def causal_bias(q_positions: Array, k_len: int, window: int = 0) -> Array:
    """[1, 1, q_len, k_len] additive mask: query at position p sees keys 0..p, or with a sliding
    `window` only keys p - window + 1..p."""
    keys, queries = jnp.arange(k_len)[None, :], q_positions[:, None]
    visible = keys <= queries
    if window:
        visible &= keys > queries - window
    return jnp.where(visible, 0.0, MASKED)[None, None].astype(jnp.float32)


def padding_bias(mask: Array) -> Array:
    """[batch, 1, 1, k_len] additive bias from a key mask [batch, k_len] (True/1 = a real token)."""
    return jnp.where(mask.astype(bool), 0.0, MASKED)[:, None, None, :].astype(jnp.float32)


def mean_pool(hidden: Array, input_mask: Array) -> Array:
    """Mean of `hidden` [n, l, e] over the positions where `input_mask` [n, l] is set (float32)."""
    mask = input_mask[..., None].astype(jnp.float32)
    return (hidden.astype(jnp.float32) * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)


def segment_bias(segment_ids: Array) -> Array:
    """[batch, 1, length, length] additive bias that keeps attention inside each packed example:
    a query sees only keys of its own segment (`segment_ids` [batch, length], one id per example
    of a row; padding's id 0 is a segment of its own)."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return jnp.where(same, 0.0, MASKED)[:, None].astype(jnp.float32)


class Attention(nn.Module):
    """Multi-head attention on flat activations [batch * length, embed], grouped-query when
    `cfg.num_kv_heads` < num_heads (each key/value head serves a group of query heads).

    Self-attention, or with `cross` cross-attention: keys and values then come from `memory`
    (flat [batch * memory_length, embed], e.g. the encoder output). `bias` is added to the scores
    (padding masks, relative position biases); a causal mask is added when `causal`.

    With `decode=True` self-attention keys and values go to a `cache` collection of `max_len`
    positions; a call with T new tokens writes them at the current index and attends causally
    over all that was written (prefill and one-token steps are the same code).

    `attend` (queries, keys, values and the additive bias in, heads out) is where attention
    prefixes and attention-map distillation attach.
    """

    cfg: BlockConfig
    causal: bool = True
    max_len: int = 0  # cache length for decoding
    cross: bool = False

    @nn.compact
    def __call__(self, x: Array, positions: Array, bias: Array | None = None,
                 memory: Array | None = None, deterministic: bool = True, decode: bool = False,
                 segment_ids: Array | None = None):
        cfg = self.cfg
        batch, length = positions.shape
        heads = lambda y, n: y.reshape(batch, -1, n, cfg.head_dim)
        # Unscaled queries (T5) take 1/sqrt(head_dim) from the query kernel's initialization, or
        # the attention logits start sqrt(head_dim) times too large and the softmax saturates.
        query_std = None if cfg.scale_queries else cfg.init_std * cfg.head_dim ** -0.5
        use_bias = cfg.use_bias or cfg.qkv_bias
        source = memory if self.cross else x
        q = heads(dense((cfg.num_heads, cfg.head_dim), ("embed", "heads", "kv"), cfg, "query",
                        std=query_std, use_bias=use_bias)(x), cfg.num_heads)
        k, v = (heads(dense((cfg.kv_heads, cfg.head_dim), ("embed", "kv_heads", "kv"), cfg, name,
                            use_bias=use_bias)(source), cfg.kv_heads) for name in ("key", "value"))
        if cfg.qk_norm:
            plus_one = cfg.norm == "rmsnorm_plus_one"  # Gemma 3's zero-centred scales
            q = RMSNorm(cfg, plus_one, name="query_norm")(q).astype(cfg.dtype)
            k = RMSNorm(cfg, plus_one, name="key_norm")(k).astype(cfg.dtype)
        if cfg.positions == "rotary" and not self.cross:
            q = rotary(q, positions, cfg.rope_theta, cfg.rope_scaling)
            k = rotary(k, positions, cfg.rope_theta, cfg.rope_scaling)
        if cfg.scale_queries:
            q = q / jnp.sqrt(cfg.query_pre_attn_scalar or cfg.head_dim).astype(q.dtype)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
        if decode and not self.cross:
            k, v, q_positions = self._update_cache(k, v)
            scores_bias = causal_bias(q_positions, self.max_len, cfg.sliding_window)
            out = self.attend(q, k, v, scores_bias if bias is None else bias + scores_bias)
        elif self.cross:
            out = self.attend(q, k, v, jnp.zeros((1, 1, 1, 1), jnp.float32) if bias is None else bias)
        elif self.splash_applies(q, k, bias):
            out = self.attend(q, k, v, None, segment_ids=segment_ids)
        else:
            mask = self.mask_bias(segment_ids, length)
            out = self.attend(q, k, v, mask if bias is None else bias + mask)
        out = out.reshape(batch * length, cfg.num_heads, cfg.head_dim)
        out = Dropout(cfg.dropout)(out, deterministic=deterministic)
        out = dense(cfg.emb_dim, ("heads", "kv", "embed"), cfg, "out", in_axis=(-2, -1),
                    std=cfg.out_init_std)(out)
        return constrain(out, RESIDUAL_AXES)

    def attend(self, q: Array, k: Array, v: Array, bias: Array | None, segment_ids: Array | None = None) -> Array:
        """softmax(q k^T + bias) v: [batch, q_len, heads, head_dim] (k, v: [batch, k_len,
        kv_heads, head_dim]). `bias` None: this layer's mask as structure (causal, sliding
        window, `segment_ids`) in the splash kernel; an interceptor that needs the additive form
        takes `mask_bias(segment_ids, q_len)`."""
        if bias is None:
            return splash.attention(q, k, v, causal=self.causal, window=self.cfg.sliding_window,
                                    segment_ids=segment_ids, softcap=self.cfg.attn_softcap)
        return dot_product_attention(q, k, v, bias, self.cfg.attention, self.cfg.attn_softcap)

    def mask_bias(self, segment_ids: Array | None, length: int) -> Array:
        """The additive form of the self-attention mask that splash takes as structure:
        [1 or batch, 1, length or 1, length or 1] of the causal/window mask and segment ids."""
        bias = jnp.zeros((1, 1, 1, 1), jnp.float32)
        if self.causal:
            bias = bias + causal_bias(jnp.arange(length), length, self.cfg.sliding_window)
        return bias if segment_ids is None else bias + segment_bias(segment_ids)

    def splash_applies(self, q: Array, k: Array, bias: Array | None) -> bool:
        """Whether this self-attention call runs the splash kernel: `model.attention` is splash
        (or auto on TPU) and the call's shape and mask suit it. Asked for by name where it does
        not apply, it is an error naming why; auto then runs XLA's."""
        if attention_implementation(self.cfg.attention, q.dtype) != "splash":
            return False
        why = splash.unsupported(q.shape[1], k.shape[1], bias is not None)
        if why and self.cfg.attention == "splash":
            raise ValueError(f"model.attention='splash' does not apply to this attention: {why} "
                             "(model.attention=auto falls back to XLA's where it does not)")
        return not why

    def _update_cache(self, k: Array, v: Array):
        """Writes k, v at the cache index; returns the whole cache and the new tokens' positions."""
        batch, length, heads, head_dim = k.shape
        shape = (batch, self.max_len, heads, head_dim)
        cached_k = self.variable("cache", "cached_key", jnp.zeros, shape, k.dtype)
        cached_v = self.variable("cache", "cached_value", jnp.zeros, shape, v.dtype)
        index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        start = index.value
        cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k, (0, start, 0, 0))
        cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v, (0, start, 0, 0))
        index.value = start + length
        return cached_k.value, cached_v.value, start + jnp.arange(length)


def relative_bucket(relative: Array, bidirectional: bool, num_buckets: int, max_distance: int):
    """T5's bucket of each key-minus-query offset: exact for small offsets, log-spaced beyond,
    all offsets past `max_distance` share the last bucket; bidirectional halves per direction."""
    bucket = jnp.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        bucket = jnp.where(relative > 0, num_buckets, 0)
        distance = jnp.abs(relative)
    else:
        distance = jnp.maximum(-relative, 0)
    exact = num_buckets // 2
    log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / exact) / jnp.log(max_distance / exact)
    far = exact + (log_ratio * (num_buckets - exact)).astype(jnp.int32)
    far = jnp.minimum(far, num_buckets - 1)
    return bucket + jnp.where(distance < exact, distance, far)


class RelativePositionBias(nn.Module):
    """T5's learned scalar bias per (bucket of key - query offset, head), shared by all layers."""

    num_buckets: int
    max_distance: int
    bidirectional: bool
    cfg: BlockConfig

    @nn.compact
    def __call__(self, q_positions: Array, k_positions: Array) -> Array:
        """[1, heads, q_len, k_len] for 1-D query and key positions."""
        table = self.param(
            "embedding", nn.with_logical_partitioning(nn.initializers.normal(self.cfg.init_std),
                                                      ("relpos_buckets", "heads")),
            (self.num_buckets, self.cfg.num_heads), self.cfg.param_dtype)
        buckets = relative_bucket(k_positions[None, :] - q_positions[:, None], self.bidirectional,
                                  self.num_buckets, self.max_distance)
        return jnp.take(table, buckets, axis=0).astype(jnp.float32).transpose(2, 0, 1)[None]


def quick_gelu(x: Array) -> Array:
    """x * sigmoid(1.702 x): CLIP's sigmoid approximation of the GELU."""
    return x * jax.nn.sigmoid(1.702 * x)


# model.mlp -> (activation, gated). gelu is the tanh approximation (GPT-2, T5.1.1's gated-gelu),
# gelu_exact the erf form (BERT, ViT); relu is T5.1.0's; quick_gelu CLIP's.
ACTIVATIONS = {
    "gelu": (functools.partial(nn.gelu, approximate=True), False),
    "gelu_exact": (functools.partial(nn.gelu, approximate=False), False),
    "quick_gelu": (quick_gelu, False),
    "relu": (nn.relu, False),
    "swiglu": (nn.silu, True),
    "geglu": (functools.partial(nn.gelu, approximate=True), True),
}


class Mlp(nn.Module):
    cfg: BlockConfig

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        cfg = self.cfg
        if cfg.mlp not in ACTIVATIONS:
            raise ValueError(f"model.mlp={cfg.mlp!r}: expected one of {sorted(ACTIVATIONS)}")
        activation, gated = ACTIVATIONS[cfg.mlp]
        up = dense(cfg.mlp_dim, ("embed", "mlp"), cfg, "wi")(x)
        if gated:  # GLU: activation(x @ wg) * (x @ wi)
            up = activation(dense(cfg.mlp_dim, ("embed", "mlp"), cfg, "wg")(x)) * up
        else:
            up = activation(up)
        up = nn.with_logical_constraint(up, ("batch", "mlp"))
        up = Dropout(cfg.dropout)(up, deterministic=deterministic)
        return constrain(dense(cfg.emb_dim, ("mlp", "embed"), cfg, "wo", std=cfg.out_init_std)(up),
                         RESIDUAL_AXES)
