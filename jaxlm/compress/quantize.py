"""Quantized weights and activations for the core layers, on qwix's quantized arrays.

`config.model.quant` says how `layers.Dense` and `layers.Embed` hold and use their weights;
`attach(model, quant)` makes them do so from outside the model code (`jaxlm.models.attach`:
`Dense.project` and the `Embed` table). Task heads (`heads.Head`) stay float.

- stored (`weights` int8 | int4 | nf4, `qat` False): the parameters ARE the quantized weights:
  `kernel` holds integer codes (the float kernel's shape) and `kernel_scale` float32 scales,
  [groups, outputs] for the kernel seen as a matrix [inputs, outputs] (int8: one scale per output
  channel; 4-bit: one per `group_size` inputs and output). Checkpoints are that much smaller, and
  `tools/quantize.py` writes such a workdir from a trained float run (post-training quantization).
  Embedding tables get one scale per row (and per group of `group_size` columns for 4-bit).
- `activations='int8'`: each layer's input is quantized per row at run time (dynamic W8A8; no
  calibration needed: the scale is the row's own absmax); with stored int8 weights the matmul runs
  int8 x int8 -> int32.
- `qat`: the parameters stay float and train; the forward pass uses their quantize->dequantize
  values and the gradient passes straight through (STE). Quantizing the trained run afterwards
  gives exactly the weights the forward pass used.

QLoRA is a stored 4-bit base (frozen, from `init_from`, quantized at load) under `peft.method=lora`.
qwix supplies the numerics (absmax scales, int4/NF4 codes, the int8 dot); what it lacks for
this stack is a parameter layout that survives Orbax (it keeps codes and scales in one `QArray`
object), so the layout is here. 4-bit codes are held in int8 arrays: TensorStore cannot write
uint4 (NF4), and XLA:CPU's compiled calls want int4 packed while JAX hands them unpacked. On disk
(compressed) they take about 4 bits.
"""

import dataclasses
import functools
import math
import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import qwix

from jaxlm.models import attach as attach_lib
from jaxlm.models.heads import Head
from jaxlm.models.layers import Dense, Embed

WEIGHT_TYPES = {"int8": jnp.int8, "int4": jnp.int4, "nf4": "nf4"}
CODES = {"int8": jnp.int8, "int4": jnp.int4, "nf4": jnp.uint4}  # what qwix computes with


@dataclasses.dataclass(frozen=True)
class Quant:
    weights: str = "none"  # none | int8 | int4 | nf4
    activations: str = "none"  # none | int8 (dynamic, per row)
    group_size: int = 128  # 4-bit weights: inputs sharing a scale (0: one per output channel)
    qat: bool = False
    targets: str = ""  # regex searched in Dense paths ('' = every Dense layer)
    embeddings: bool = True  # quantize token embedding tables too

    @property
    def active(self) -> bool:
        return self.weights != "none" or self.activations != "none"

    @property
    def stored(self) -> bool:
        """The parameters hold integer codes (not trainable)."""
        return self.weights != "none" and not self.qat

    def applies(self, path: tuple[str, ...]) -> bool:
        return self.active and (not self.targets or bool(re.search(self.targets, "/".join(path))))

    def groups(self, n_in: int, where: str) -> int:
        """Scales along the input axis: 1 for int8 (per channel), n_in / group_size for 4-bit."""
        if self.weights in ("none", "int8") or not self.group_size or self.group_size >= n_in:
            return 1
        if n_in % self.group_size:
            raise ValueError(f"model.quant.group_size={self.group_size} does not divide the "
                             f"{n_in} inputs of {where}")
        return n_in // self.group_size


def from_config(m) -> Quant:
    """The `Quant` of `config.model` (checked)."""
    q = Quant(**m.quant.to_dict())
    if q.weights not in ("none", *WEIGHT_TYPES):
        raise ValueError(f"model.quant.weights={q.weights!r}: expected none, int8, int4 or nf4")
    if q.activations not in ("none", "int8"):
        raise ValueError(f"model.quant.activations={q.activations!r}: expected none or int8")
    if q.activations == "int8" and q.weights not in ("none", "int8"):
        raise ValueError(f"model.quant.activations='int8' needs model.quant.weights int8 or none, "
                         f"not {q.weights!r}")
    if q.group_size < 0:
        raise ValueError(f"model.quant.group_size={q.group_size} must be >= 0")
    if q.qat and q.weights == "none" and q.activations == "none":
        raise ValueError("model.quant.qat=True needs model.quant.weights or model.quant.activations")
    return q


def float_model(m):
    """A copy of `config.model` without quantization (the layout float checkpoints have)."""
    m = m.copy_and_resolve_references()
    m.quant.update(dict(weights="none", activations="none", qat=False))
    return m


def quantize(w: jax.Array, q: Quant, channel_axes: tuple[int, ...], group_axis: int, groups: int):
    """qwix's quantized array of `w`: one scale per index of `channel_axes`, `groups` scales
    along `group_axis`."""
    tiles = {group_axis: w.shape[group_axis] // groups} if groups > 1 else {}
    return qwix.quantize(w, WEIGHT_TYPES[q.weights], channelwise_axes=channel_axes, tiled_axes=tiles)


def straight_through(w: jax.Array, fake: jax.Array) -> jax.Array:
    """`fake` forward, identity backward."""
    return w + jax.lax.stop_gradient(fake - w)


def _qarray(codes, scale, q: Quant):
    return qwix.QArray(qvalue=codes.astype(CODES[q.weights]), scale=scale, qtype=WEIGHT_TYPES[q.weights])


def _matrix_weights(module: nn.Module, shape, n_in: int, axes, init, q: Quant, cfg):
    """The kernel as [n_in, n_out]: a QArray (stored), fake-quantized floats (QAT) or floats."""
    n_out = math.prod(shape) // n_in
    if q.stored:
        codes = module.param("kernel", nn.with_logical_partitioning(nn.initializers.zeros, axes),
                             shape, jnp.int8)
        scale = module.param("kernel_scale", nn.with_logical_partitioning(nn.initializers.ones, (None, None)),
                             (q.groups(n_in, "/".join(module.path)), n_out), jnp.float32)
        return _qarray(codes.reshape(n_in, n_out), scale, q)
    kernel = module.param("kernel", nn.with_logical_partitioning(init, axes), shape,
                          cfg.param_dtype).reshape(n_in, n_out)
    if q.weights == "none":
        return kernel
    fake = qwix.dequantize(quantize(kernel, q, (1,), 0, q.groups(n_in, "/".join(module.path))))
    return straight_through(kernel, fake)


def dense(module: nn.Module, x: jax.Array, num_in: int, shape: tuple[int, ...], axes, init, q: Quant, cfg):
    """`layers.Dense.project` under `q`: `x` contracted over its last `num_in` axes with a kernel
    of `shape` [*inputs, *outputs] (stored quantized, or fake-quantized for QAT)."""
    lead, n_in = x.shape[:x.ndim - num_in], math.prod(shape[:num_in])
    w = _matrix_weights(module, shape, n_in, axes, init, q, cfg)
    x = x.reshape(*lead, n_in).astype(cfg.dtype)
    row_axes = tuple(range(x.ndim - 1))
    contract = (((x.ndim - 1,), (0,)), ((), ()))
    if q.activations == "int8" and q.stored:
        x = qwix.quantize(x, jnp.int8, channelwise_axes=row_axes)
        y = qwix.dot_general(x, w, contract, preferred_element_type=jnp.float32).astype(cfg.dtype)
    else:
        if q.activations == "int8":
            x = straight_through(x, qwix.dequantize(qwix.quantize(x, jnp.int8, channelwise_axes=row_axes)))
        if isinstance(w, qwix.QArray):
            w = qwix.dequantize(w)
        y = jax.lax.dot_general(x, w.astype(cfg.dtype), contract)
    return y.reshape(*lead, *shape[num_in:])


def embedding_table(module: nn.Module, vocab_size: int, axes, init, q: Quant, cfg):
    """`layers.Embed`'s table: (codes, scales) when stored, else the float table (fake-quantized
    under QAT). Stored tables dequantize only the rows a lookup takes (`embedding_rows`)."""
    shape = (vocab_size, cfg.emb_dim)
    groups = q.groups(cfg.emb_dim, "/".join(module.path))
    if q.stored:
        codes = module.param("embedding", nn.with_logical_partitioning(nn.initializers.zeros, axes),
                             shape, jnp.int8)
        scale = module.param("embedding_scale", nn.with_logical_partitioning(nn.initializers.ones, (axes[0], None)),
                             (vocab_size, groups), jnp.float32)
        return codes, scale
    table = module.param("embedding", nn.with_logical_partitioning(init, axes), shape, cfg.param_dtype)
    if q.weights == "none":
        return table
    return straight_through(table, qwix.dequantize(quantize(table, q, (0,), 1, groups)))


def embedding_rows(table, ids: jax.Array, q: Quant) -> jax.Array:
    """Rows `ids` of a table from `embedding_table`, as floats."""
    if not isinstance(table, tuple):
        return jnp.take(table, ids, axis=0)
    codes, scale = table
    return qwix.dequantize(_qarray(jnp.take(codes, ids, axis=0), jnp.take(scale, ids, axis=0), q))


def embedding_matrix(table, q: Quant) -> jax.Array:
    """The whole table as floats (tied output logits)."""
    return table if not isinstance(table, tuple) else qwix.dequantize(_qarray(*table, q))


def intercept(q: Quant, next_fun, args, kwargs, context):
    """`Dense.project` (heads excepted) and the `Embed` table under `q`."""
    module = context.module
    if (attach_lib.calls(context, Dense, "project") and not isinstance(module, Head)
            and q.applies(module.path)):
        x = args[0]
        in_axes = module.contracted_axes(x)
        if in_axes != tuple(range(x.ndim - len(in_axes), x.ndim)):
            raise ValueError(f"{'/'.join(module.path)}: quantized layers contract trailing axes only")
        shape = tuple(x.shape[a] for a in in_axes) + module.features
        return dense(module, x, len(in_axes), shape, module.axes, module.kernel_init(), q, module.cfg)
    if not (isinstance(module, Embed) and q.embeddings):
        return next_fun(*args, **kwargs)
    cfg = module.cfg
    if context.method_name == "setup":
        module.embedding = embedding_table(module, module.vocab_size, ("vocab", "embed"),
                                           nn.initializers.normal(cfg.init_std), q, cfg)
        return None
    if context.method_name == "__call__":
        return embedding_rows(module.embedding, args[0], q).astype(cfg.dtype)
    if context.method_name == "attend":
        return jnp.einsum("...d,vd->...v", args[0], embedding_matrix(module.embedding, q).astype(cfg.dtype))
    return next_fun(*args, **kwargs)


def attach(model, q: Quant):
    """`model` computing with quantized weights (and activations) as `q` says (itself when `q`
    quantizes nothing)."""
    return attach_lib.attach(model, functools.partial(intercept, q)) if q.active else model


def quantize_params(params, abstract, q: Quant):
    """`params` (float, any subset of a model's) in the layout of a stored-quantized model
    (`abstract`: its parameter shapes, e.g. from `jax.eval_shape` of its init): each kernel or
    embedding that has a `*_scale` there becomes codes + scales, the rest is kept as it is.
    Stacked layers (a leading [layers] axis) get their own scales per layer."""
    wanted = flax.traverse_util.flatten_dict(abstract)
    out = {}
    for name, value in flax.traverse_util.flatten_dict(params).items():
        scale_name = name[:-1] + (name[-1] + "_scale",)
        if scale_name not in wanted or value.dtype == wanted[name].dtype:
            out[name] = value
            continue
        scale_shape = wanted[scale_name].shape
        if name[-1] == "embedding":  # [*stack, vocab, embed], a scale per row (and group)
            stack = value.ndim - 2
            qarray = quantize(value, q, tuple(range(stack + 1)), stack + 1, scale_shape[-1])
        else:  # [*stack, *inputs, *outputs] as [*stack, n_in, n_out]
            stack = len(scale_shape) - 2
            matrix = value.reshape(*value.shape[:stack], -1, scale_shape[-1])
            qarray = quantize(matrix, q, tuple(range(stack)) + (stack + 1,), stack, scale_shape[-2])
        out[name] = qarray.qvalue.astype(jnp.int8).reshape(wanted[name].shape)
        out[scale_name] = qarray.scale.astype(jnp.float32).reshape(scale_shape)
    return flax.traverse_util.unflatten_dict(out)


def dequantize_params(params, q: Quant):
    """The float parameters that stored-quantized `params` stand for (`quantize_params` undone
    up to its rounding): every `*_scale` and its codes become one float array."""
    flat = flax.traverse_util.flatten_dict(params)
    out = {}
    for name, value in flat.items():
        scale_name = name[:-1] + (name[-1] + "_scale",)
        if name[-1].endswith("_scale") and name[:-1] + (name[-1][:-len("_scale")],) in flat:
            continue
        if scale_name not in flat:
            out[name] = value
            continue
        scale = jnp.asarray(flat[scale_name])
        codes = jnp.asarray(value)
        if name[-1] != "embedding":  # [*stack, *inputs, *outputs] as [*stack, n_in, n_out]
            codes = codes.reshape(*scale.shape[:-2], -1, scale.shape[-1])
        out[name] = qwix.dequantize(_qarray(codes, scale, q)).astype(jnp.float32).reshape(value.shape)
    return flax.traverse_util.unflatten_dict(out)


def check_trainable(trainable_params, q: Quant) -> None:
    """Stored (integer) weights cannot train: an error naming the way that can."""
    ints = [n for n, leaf in flax.traverse_util.flatten_dict(trainable_params, sep="/").items()
            if not jnp.issubdtype(leaf.dtype, jnp.floating)]
    if ints:
        raise ValueError(f"model.quant.weights={q.weights!r} stores integer weights, "
                         f"which cannot train ({ints[0]}, ...): such a model is for evaluation and "
                         "generation; train with model.quant.qat=True, or freeze the base with a PEFT "
                         "method (peft.method=lora: QLoRA)")
