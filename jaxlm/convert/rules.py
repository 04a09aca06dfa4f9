"""The vocabulary the family tables are written in: tensor rules, their transforms, `Family`.

A `Rule` says that one Hugging Face tensor holds one or more jaxlm parameters and how the two
layouts relate; the same rule converts both ways. Names with `{i}` are per layer: the HF name
`encoder.layer.{i}.…` and the jaxlm path `encoder/layers_{i}/…` (the unscanned layout; the engine
stacks layers for `scan_layers`).
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np

# Hugging Face `hidden_act`-style names -> jaxlm `model.mlp`. HF's "gelu" is the exact (erf)
# form; "gelu_new" and "gelu_pytorch_tanh" are the tanh approximation jaxlm calls "gelu".
ACTIVATIONS = {"gelu": "gelu_exact", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu": "relu",
               "quick_gelu": "quick_gelu"}


@dataclasses.dataclass(frozen=True)
class Copy:
    """Stored alike (embeddings, norm scales, position tables, class token); HF adds `hf_lead`
    leading axes of size 1 (ViT's position table is [1, N + 1, E]), or with `flat` stores it as a
    vector (CLIP's class embedding [E] for jaxlm's [1, 1, E])."""

    hf_lead: int = 0
    flat: bool = False

    def to_jaxlm(self, x, shapes):
        return [x.reshape(shapes[0])]

    def to_hf(self, xs):
        if self.flat:
            return xs[0].reshape(-1)
        return xs[0].reshape((1,) * self.hf_lead + xs[0].shape)


@dataclasses.dataclass(frozen=True)
class Vector:
    """A bias: flat in HF, [heads, head_dim] for jaxlm's q/k/v; GPT-2's c_attn packs q, k, v."""

    def to_jaxlm(self, x, shapes):
        return [part.reshape(shape) for part, shape in zip(np.split(x, len(shapes)), shapes)]

    def to_hf(self, xs):
        return np.concatenate([x.ravel() for x in xs])


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A Dense kernel [*inputs, *outputs] that HF stores as a matrix: a torch Linear [out, in],
    or with `conv` GPT-2's Conv1D [in, out]. The first `n_in` kernel axes are inputs (2 for the
    attention output [heads, head_dim, embed]); several jaxlm kernels sit side by side along the
    output axis (GPT-2's c_attn)."""

    n_in: int = 1
    conv: bool = False

    def to_jaxlm(self, x, shapes):
        matrix = x if self.conv else x.T
        return [part.reshape(shape) for part, shape in zip(np.split(matrix, len(shapes), axis=1), shapes)]

    def to_hf(self, xs):
        matrix = np.concatenate([x.reshape(math.prod(x.shape[:self.n_in]), -1) for x in xs], axis=1)
        return matrix if self.conv else matrix.T


@dataclasses.dataclass(frozen=True)
class Patches:
    """ViT's patch convolution [E, C, p, p] <-> jaxlm's `patch_embed` kernel [p * p * C, E], whose
    rows follow each patch flattened in (row, column, channel) order."""

    patch_size: int
    channels: int

    def to_jaxlm(self, x, shapes):
        return [x.transpose(2, 3, 1, 0).reshape(shapes[0])]

    def to_hf(self, xs):
        p = self.patch_size
        return xs[0].reshape(p, p, self.channels, -1).transpose(3, 2, 0, 1)


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str
    jaxlm: tuple[str, ...]
    transform: Any

    def expand(self, i: int) -> "Rule":
        return Rule(_layer(self.hf, i), tuple(_layer(p, i) for p in self.jaxlm), self.transform)


def _layer(name: str, i: int) -> str:
    return name.replace("{i}", str(i))


def copy(hf: str, ours: str, hf_lead: int = 0, flat: bool = False) -> list[Rule]:
    return [Rule(hf, (ours,), Copy(hf_lead, flat))]


def dense(hf: str, ours, *, bias: bool = True, n_in: int = 1, conv: bool = False) -> list[Rule]:
    """`hf`.weight (and .bias) -> the kernel (and bias) of jaxlm Dense `ours` (a path, or several
    packed side by side)."""
    ours = (ours,) if isinstance(ours, str) else tuple(ours)
    rules = [Rule(f"{hf}.weight", tuple(f"{o}/kernel" for o in ours), Kernel(n_in, conv))]
    if bias:
        rules.append(Rule(f"{hf}.bias", tuple(f"{o}/bias" for o in ours), Vector()))
    return rules


def norm(hf: str, ours: str, bias: bool = True) -> list[Rule]:
    """A LayerNorm (`weight`, `bias`) or T5 RMSNorm (`weight`) -> jaxlm `scale` (and `bias`)."""
    rules = copy(f"{hf}.weight", f"{ours}/scale")
    return rules + copy(f"{hf}.bias", f"{ours}/bias") if bias else rules


def attention(hf_qkv: str, hf_out: str, ours: str, names=("query", "key", "value"),
              bias: bool = True) -> list[Rule]:
    """The q, k, v projections `{hf_qkv}.{name}` and the output projection `hf_out` -> jaxlm
    Attention `ours` (query, key, value [embed, heads, head_dim]; out [heads, head_dim, embed])."""
    rules = []
    for name, mine in zip(names, ("query", "key", "value")):
        rules += dense(f"{hf_qkv}.{name}", f"{ours}/{mine}", bias=bias)
    return rules + dense(hf_out, f"{ours}/out", bias=bias, n_in=2)


def _unchanged(hf: dict) -> dict:
    return hf


@dataclasses.dataclass(frozen=True)
class Family:
    """How one Hugging Face `model_type` maps onto one jaxlm model family.

    Config: `keys` copy HF values to jaxlm `config.model` keys (both ways), `fixed` are the jaxlm
    values the family always has, `required` the HF options jaxlm supports only at one value,
    `activation` names the HF key of the MLP activation and its {HF: jaxlm} table. `normalize`
    derives HF values that config.json may leave implicit (run after `hf_defaults` are filled in).
    `to_hf` adds HF keys derived from the jaxlm config and parameters on export, `model_values`
    jaxlm values derived from the HF config on import (nested ones such as rotary scaling).

    Tensors: `rules(hf)` is the table; `stacks` maps each jaxlm layer stack to the HF key with
    its depth; `tied(hf)` lists HF names that repeat another tensor (tied weights); `ignored` are
    buffers and tensors transformers itself never reads. `prefix` is the backbone's prefix in the
    class with heads (`architectures[0]`); names starting with one of `top_level` have none.
    `heads` are the jaxlm modules only the class with heads has; `optional` the jaxlm modules or
    parameters a file may lack: left out of an import (for a fresh init), dropped from an export
    when all zero.
    """

    model_type: str
    name: str
    architectures: tuple[str, str]  # (with heads, backbone only)
    keys: dict
    fixed: dict
    activation: tuple[str, dict]
    stacks: dict
    rules: Callable[[dict], list[Rule]]
    init_inputs: Callable[[dict], dict]  # model.init keyword arguments, for parameter shapes
    hf_defaults: dict = dataclasses.field(default_factory=dict)
    required: dict = dataclasses.field(default_factory=dict)
    normalize: Callable[[dict], dict] = _unchanged
    to_hf: Callable[[dict, dict], dict] = lambda model, params: {}
    model_values: Callable[[dict], dict] = lambda hf: {}  # config.model values beyond `keys`
    tied: Callable[[dict], dict] = lambda hf: {}
    ignored: tuple[str, ...] = ()
    prefix: str = ""
    top_level: tuple[str, ...] = ()
    heads: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    tokenizers: tuple[tuple[str, str], ...] = ()  # (HF file, jaxlm tokenizer kind), first found


@dataclasses.dataclass(frozen=True)
class Tower:
    """One tower of a dual encoder: the `Family` of its Hugging Face sub-config `hf_key` (e.g.
    `text_config`), whose tensors are named under `hf_prefix` (`text_model.`); jaxlm holds it in
    the `config` section `section` (`model`, `image_model`) and its parameters under `ours`
    (`text`, `image`)."""

    family: Family
    hf_key: str
    hf_prefix: str
    section: str
    ours: str


@dataclasses.dataclass(frozen=True)
class DualFamily:
    """A dual encoder (CLIP) in one Hugging Face file <-> jaxlm's `image_text` task.

    Each of `towers` is a `Family` of its own, applied to its sub-config and its tensors; `rules`
    convert the tensors outside the towers (the projections; the logit scale, a parameter of the
    task) and `config(hf)` gives the run's values outside the towers ({section: values}: the
    task, the data). `task_params` are the task's scalar parameters among those `rules` fill;
    `ignored` are top-level buffers transformers never reads.
    """

    model_type: str
    architectures: tuple[str, ...]
    towers: tuple[Tower, ...]
    rules: Callable[[dict], list[Rule]]
    config: Callable[[dict], dict]
    hf_defaults: dict = dataclasses.field(default_factory=dict)
    task_params: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()
    tokenizers: tuple[tuple[str, str], ...] = ()
    prefix: str = ""  # as Family's (none: the towers' tensors are named under their `hf_prefix`)
    name: str = "dual_encoder"  # what jaxlm builds of it (jaxlm.models.dual_encoder)
