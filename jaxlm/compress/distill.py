"""Knowledge distillation: the losses and the layer bookkeeping (`jaxlm.tasks.distillation` runs them).

Soft targets (Hinton et al. 2015): T^2 * KL(softmax(teacher / T) || softmax(student / T)) per
target position, mixed with the student's cross-entropy on the labels. Optional TinyBERT-style
terms match student layer i to teacher layer round((i + 1) * Lt / Ls) - 1: the MSE between the
student's hidden states (through a learned projection to the teacher's width) and the teacher's,
and the KL between their attention maps (head by head).
"""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.models import attach as attach_lib
from jaxlm.models.layers import Attention, repeat_kv_heads
from jaxlm.models.transformer import LAYER, Block

ATTENTION_SCORES = "attention_scores"  # collection of pre-softmax scores, sown only when mutable


def soft_kl(student_logits, teacher_logits, temperature: float):
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)) over the last axis (float32)."""
    t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, -1)
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, -1)
    return temperature ** 2 * jnp.sum(jnp.exp(t) * (t - s), -1)


def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """The teacher layer each student layer matches: round((i + 1) * Lt / Ls) - 1."""
    return [int(round((i + 1) * teacher_layers / student_layers)) - 1 for i in range(student_layers)]


def parse_layers(text: str, student_layers: int, teacher_layers: int) -> list[int]:
    """`distill.init_layers` ("0,2,4") as a list: one teacher layer per student layer."""
    try:
        layers = [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"distill.init_layers={text!r}: expected comma-separated teacher layer "
                         "numbers, e.g. '0,2,4'") from None
    if len(layers) != student_layers or not all(0 <= i < teacher_layers for i in layers):
        raise ValueError(f"distill.init_layers={text!r}: expected {student_layers} teacher layers "
                         f"(model.num_layers) in 0..{teacher_layers - 1}")
    return layers


def student_from_teacher(teacher: dict, student_shapes: dict, layers: list[int]) -> dict:
    """The student parameters the teacher gives: student layer j is teacher layer `layers[j]`
    (`layers_J` names, or row J of a scanned `layers` stack); every other parameter (embeddings,
    norms, pooler, heads) comes over where the teacher has it with the same shape."""
    source = flax.traverse_util.flatten_dict(teacher)
    copied = {}
    for path, leaf in flax.traverse_util.flatten_dict(student_shapes).items():
        value = _teacher_value(source, path, layers)
        name = "/".join(path)
        in_layer = any(LAYER.match(k) or k == "layers" for k in path)
        if value is None or value.shape != leaf.shape:
            if in_layer:
                got = "nothing" if value is None else f"shape {value.shape}"
                raise ValueError(f"distill.init_layers: the student's {name} {tuple(leaf.shape)} "
                                 f"has {got} in the teacher (layers must have the teacher's shapes)")
            continue
        copied[path] = np.array(value)  # a host copy: the student must not share the teacher's buffers
    return flax.traverse_util.unflatten_dict(copied)


def _teacher_value(source: dict, path: tuple, layers: list[int]):
    if "layers" in path:  # a scanned stack: take the teacher's rows
        value = source.get(path)
        return None if value is None else np.asarray(value)[np.asarray(layers)]
    path = tuple(f"layers_{layers[int(m.group(1))]}" if (m := LAYER.match(k)) else k for k in path)
    return source.get(path)


def intercept_attention_maps(next_fun, args, kwargs, context):
    """`Attention.attend` that also sows its pre-softmax scores (masked) when the
    ATTENTION_SCORES collection is mutable."""
    module = context.module
    if attach_lib.calls(context, Attention, "attend") and module.is_mutable_collection(ATTENTION_SCORES):
        q, k, _, bias = args
        if bias is None:  # splash's structured mask
            bias = module.mask_bias(kwargs.get("segment_ids"), q.shape[1])
        k = repeat_kv_heads(k, q.shape[2])
        module.sow(ATTENTION_SCORES, "scores", jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) + bias)
    return next_fun(*args, **kwargs)


def with_attention_maps(model):
    """`model` whose self-attention layers sow their scores (see `attention_scores`)."""
    return attach_lib.attach(model, intercept_attention_maps)


def is_block(module, method_name: str) -> bool:
    """`capture_intermediates` filter: the output of every Transformer block."""
    return isinstance(module, Block) and method_name == "__call__"


def _by_layer(tree: dict, keep) -> list:
    """The values of a flattened collection whose path `keep`s, ordered by their `layers_N`."""
    found = []
    for path, value in flax.traverse_util.flatten_dict(tree).items():
        index = [int(m.group(1)) for k in path if (m := LAYER.match(k))]
        if index and keep(path):
            found.append((index[0], value[0]))
    return [v for _, v in sorted(found, key=lambda p: p[0])]


def hidden_states(intermediates: dict) -> list:
    """Each block's output (flat [batch * length, embed]) in layer order."""
    return [out[0] for out in _by_layer(intermediates, lambda p: p[-1] == "__call__")]


def attention_scores(collection: dict) -> list:
    """Each block's self-attention scores [batch, heads, q, k] (pre-softmax, masked) in layer order."""
    return _by_layer(collection, lambda p: p[-2:] == ("attn", "scores"))


def mutable_collections(hidden: bool, attention: bool) -> list[str]:
    return (["intermediates"] if hidden else []) + ([ATTENTION_SCORES] if attention else [])


class HiddenProjection(nn.Module):
    """One learned linear map per student layer, student width -> teacher width."""

    features: int

    @nn.compact
    def __call__(self, states: list) -> list:
        return [nn.Dense(self.features, name=f"layer_{i}")(h) for i, h in enumerate(states)]


def hidden_mse(student: list, teacher: list, shape: tuple):
    """Mean over the matched layers of the per-token MSE (mean over features), [batch, length]."""
    errors = [jnp.mean((s.astype(jnp.float32) - t.astype(jnp.float32)) ** 2, -1).reshape(shape)
              for s, t in zip(student, teacher)]
    return sum(errors) / len(errors)


def attention_kl(student: list, teacher: list):
    """Mean over the matched layers and the heads of KL(teacher || student) of each query's
    attention distribution, [batch, length]. Masked keys have probability 0 in both."""
    per_layer = []
    for s, t in zip(student, teacher):
        lt, ls = jax.nn.log_softmax(t, -1), jax.nn.log_softmax(s, -1)
        per_layer.append(jnp.mean(jnp.sum(jnp.exp(lt) * (lt - ls), -1), 1))
    return sum(per_layer) / len(per_layer)


def sum_over_targets(per_token, mask, weights):
    """A per-token loss [batch, length] summed as the task's targets count: per row (the mean
    over the row's `mask`ed tokens) when `weights` is [batch], else per weighted token."""
    mask = mask.astype(jnp.float32)
    if weights.ndim == 1:
        rows = jnp.sum(per_token * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)
        return jnp.sum(rows * weights)
    return jnp.sum(per_token * weights * mask)
