"""Pruning: magnitude (per layer or global, one-shot or gradual), N:M, and heads/neurons.

`config.prune.method` picks it:

- `magnitude`: the smallest |w| of the target kernels are zeroed, `prune.sparsity` of each kernel
  (scope `layer`; each layer of a scanned stack on its own) or of all of them together
  (`global`). Gradual pruning follows Zhu & Gupta's schedule: masks are recomputed every
  `prune.every` steps from `begin_step` to `end_step` at
  s_t = s_f + (s_i - s_f) * (1 - (t - begin) / (end - begin))**3; begin == end prunes once.
- `nm`: in every group of `m` consecutive weights along a kernel's input (contraction) axis the
  `n` largest survive (2:4, what sparse tensor cores run), on the same update steps.
- `heads`: whole attention heads (their query/key/value columns and biases, their `out` rows)
  and MLP neurons (the `wi`/`wg` column and bias, the `wo` row), the same count in every layer,
  chosen once at the start by a first-order Taylor estimate of the loss change from removing
  them, |sum(w * dL/dw)| over the unit's weights (Molchanov et al.; for a head this is
  Michel et al.'s head-gate gradient), averaged over `importance_batches` train batches.
  `tools/prune_export.py` then cuts them out: a smaller plain model.

Pruning is an optax transformation wrapped around the run's optimizer (`optimizer`): its state
(`PruneState`) holds the inner optimizer's state, the masks (bool, one per pruned parameter, in a
params-shaped tree with `optax.MaskedNode()` elsewhere, so each is sharded and saved like its
parameter), the steps done and the masks' sparsity (logged as `train/sparsity`). Each update masks
the gradients before the inner optimizer and returns updates that leave the pruned weights exactly
zero after `optax.apply_updates` (`where(mask, u, -w)`), so they stay zero under Adam and weight
decay. Magnitude and N:M masks are recomputed inside the jitted step (a `lax.cond` on the update
steps): an update computes the masks of the step that follows it, from the weights it produced,
so every step's loss sees the masks of its step (`start` computes those of step 0 and, for
'heads', the importance masks, before the first step). Pruned weights are zero, hence ranked
last: masks only grow. Only parameters that train are pruned (frozen ones are not in checkpoints).
"""

import logging
import re
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlm import tree

log = logging.getLogger("jaxlm")

METHODS = ("none", "magnitude", "nm", "heads")
SCOPES = ("layer", "global")
# method 'heads': the parameters holding a layer's attention heads (along their `heads` axis) or
# MLP neurons (along `mlp`); the `out` and `wo` biases are added after the sum over them.
UNIT_PARAMS = {"heads": r"/attn/(query|key|value)/(kernel|bias)$|/attn/out/kernel$",
               "mlp": r"/mlp/(wi|wg)/(kernel|bias)$|/mlp/wo/kernel$"}
UNIT_KEYS = {"heads": "prune.heads_pruned", "mlp": "prune.mlp_pruned"}


def check(config) -> None:
    """Raises naming the `prune.*` key whose value cannot work."""
    p = config.prune
    if p.method not in METHODS:
        raise ValueError(f"prune.method={p.method!r}: expected one of {list(METHODS)}")
    if p.method in ("magnitude", "nm"):
        _check_schedule(p, config.train.steps)
        try:
            re.compile(p.targets)
        except re.error as e:
            raise ValueError(f"prune.targets={p.targets!r} is not a regex: {e}") from e
    if p.method == "magnitude":
        if p.scope not in SCOPES:
            raise ValueError(f"prune.scope={p.scope!r}: expected one of {list(SCOPES)}")
        if not 0 <= p.sparsity < 1:
            raise ValueError(f"prune.sparsity={p.sparsity}: expected 0 <= sparsity < 1")
        if not 0 <= p.initial_sparsity <= p.sparsity:
            raise ValueError(f"prune.initial_sparsity={p.initial_sparsity}: expected 0 <= "
                             f"initial_sparsity <= prune.sparsity={p.sparsity}")
    if p.method == "nm" and not 0 < p.n < p.m:
        raise ValueError(f"prune.n={p.n}, prune.m={p.m}: expected 0 < n < m (e.g. 2:4)")
    if p.method == "heads":
        _check_units(config)


def _check_schedule(p, steps: int) -> None:
    if p.begin_step < 0:
        raise ValueError(f"prune.begin_step={p.begin_step}: expected >= 0")
    if p.end_step < p.begin_step:
        raise ValueError(f"prune.end_step={p.end_step} is before prune.begin_step={p.begin_step}")
    if p.end_step >= steps:
        raise ValueError(f"prune.end_step={p.end_step}: the last mask update must come before the "
                         f"last step (train.steps={steps})")
    if p.every < 1:
        raise ValueError(f"prune.every={p.every}: expected >= 1")


def _check_units(config) -> None:
    p, m = config.prune, config.model
    if m.name not in ("bert", "gpt"):
        raise ValueError(f"prune.method='heads' prunes BERT and GPT layers, not model.name={m.name!r}")
    if m.num_kv_heads not in (0, m.num_heads):
        raise ValueError(f"prune.method='heads' prunes multi-head attention, not grouped-query "
                         f"(model.num_kv_heads={m.num_kv_heads} < model.num_heads={m.num_heads})")
    units = {"heads": m.num_heads, "mlp": m.mlp_dim or 4 * m.emb_dim}
    fractions = _fractions(p)
    if not any(fractions.values()):
        raise ValueError("prune.method='heads' needs prune.heads_pruned or prune.mlp_pruned > 0")
    for unit, fraction in fractions.items():
        if not 0 <= fraction < 1 or units[unit] - _dropped(fraction, units[unit]) < 1:
            raise ValueError(f"{UNIT_KEYS[unit]}={fraction}: expected a share in [0, 1) that keeps "
                             f"at least one of the {units[unit]} per layer")
    if p.importance_batches < 1:
        raise ValueError(f"prune.importance_batches={p.importance_batches}: expected >= 1")


def _fractions(p) -> dict:
    return {"heads": p.heads_pruned, "mlp": p.mlp_pruned}


def _dropped(fraction: float, units: int) -> int:
    return int(round(fraction * units))


# --- Which parameters carry masks --------------------------------------------------------------

def masked_fn(config):
    """`name -> bool`: whether `config.prune` masks the parameter ('a/b/c' names)."""
    p = config.prune
    if p.method == "none":
        return lambda name: False
    if p.method == "heads":
        patterns = [UNIT_PARAMS[u] for u, fraction in _fractions(p).items() if fraction > 0]
    else:
        patterns = [p.targets]
    regex = re.compile("|".join(f"(?:{q})" for q in patterns))
    return lambda name: regex.search(name) is not None


def masked_axes(config, task, partitioner, warn: bool = False) -> tuple[dict, dict]:
    """('a/b/c' name -> logical axis names, name -> shape) of every parameter `config.prune`
    masks (a scanned stack's axes start with 'layers').

    Frozen parameters are never pruned (checkpoints do not hold them, e.g. a distillation
    teacher); a method that would prune only frozen ones is an error naming them, and so is any
    frozen head or neuron under method 'heads' (every layer must lose the same units).
    """
    check(config)
    with partitioner.context():
        boxed = jax.eval_shape(lambda: task.init(jax.random.key(0))["params"])
    specs = flax.traverse_util.flatten_dict(flax.core.unfreeze(nn.get_partition_spec(boxed)), sep="/")
    flat = flax.traverse_util.flatten_dict(nn.unbox(boxed), sep="/")
    shapes = {n: tuple(x.shape) for n, x in flat.items()}
    masked = masked_fn(config)
    trainable = [n for n in shapes if task.trainable(n)]
    chosen = [n for n in trainable if masked(n)]
    stuck = [n for n in shapes if masked(n) and not task.trainable(n)]
    if stuck and (config.prune.method == "heads" or not chosen):
        raise ValueError(f"prune.method={config.prune.method!r} would prune frozen parameters "
                         f"({', '.join(stuck[:3])}{' ...' if len(stuck) > 3 else ''}; peft.method="
                         f"{config.peft.method!r}, peft.frozen={config.peft.frozen!r}): prune "
                         "parameters that train")
    if not chosen:
        raise ValueError(f"prune.targets={config.prune.targets!r} matches no parameter of this model "
                         f"(e.g. {', '.join(trainable[:3])})")
    if stuck and warn:
        log.warning("prune: %d frozen parameters match and stay unpruned (%s ...)", len(stuck), stuck[0])
    return {n: tuple(specs[n]) for n in chosen}, {n: shapes[n] for n in chosen}


def _is_hole(x) -> bool:
    return isinstance(x, optax.MaskedNode)


def _named(masks) -> dict:
    """'a/b/c' -> mask, of a params-shaped tree of masks (holes left out)."""
    flat = flax.traverse_util.flatten_dict(masks, sep="/")
    return {n: m for n, m in flat.items() if not _is_hole(m)}


def _shaped(named: dict, params):
    """The params-shaped tree of the masks in `named` ('a/b/c' -> mask), holes elsewhere."""
    name = lambda path: "/".join(str(getattr(k, "key", k)) for k in path)
    return jax.tree_util.tree_map_with_path(lambda path, _: named.get(name(path), optax.MaskedNode()), params)


def masks(opt_state) -> dict:
    """The masks a pruning optimizer state holds, as a nested dict of the pruned parameters only
    ({} when `opt_state` is not one)."""
    if not isinstance(opt_state, PruneState):
        return {}
    return flax.traverse_util.unflatten_dict(_named(opt_state.masks), sep="/")


def apply(masks, tree):
    """`tree` (parameters or gradients) with the masked entries exactly zero (`masks` params-shaped)."""
    return jax.tree.map(lambda m, x: x if _is_hole(m) else jnp.where(m, x, jnp.zeros((), x.dtype)),
                        masks, tree, is_leaf=_is_hole)


def sparsity(masks) -> jax.Array:
    """The share of masked-out entries over all masks."""
    leaves = jax.tree.leaves(masks)
    kept = sum(jnp.sum(m, dtype=jnp.float32) for m in leaves)
    return 1.0 - kept / sum(m.size for m in leaves)


# --- The schedule and the masks the step recomputes --------------------------------------------

def is_update_step(p, step: jax.Array) -> jax.Array:
    """Whether the masks are recomputed before the step that starts at `step` (steps done)."""
    in_range = (step >= p.begin_step) & (step <= p.end_step)
    return in_range & (((step - p.begin_step) % p.every == 0) | (step == p.end_step))


def scheduled_sparsity(p, step: jax.Array) -> jax.Array:
    """Zhu & Gupta's s_t at an update step (one-shot: the final sparsity)."""
    if p.end_step == p.begin_step:
        return jnp.float32(p.sparsity)
    progress = (step - p.begin_step) / (p.end_step - p.begin_step)
    return jnp.float32(p.sparsity + (p.initial_sparsity - p.sparsity) * (1 - progress) ** 3)


def keep_largest(scores: jax.Array, drop) -> jax.Array:
    """True for all but the `drop` smallest entries along the last axis (ties: earlier ones go)."""
    rank = jnp.argsort(jnp.argsort(scores, axis=-1, stable=True), axis=-1, stable=True)
    return rank >= drop


def input_axis(axes: tuple) -> int:
    """The last contraction axis of a Dense kernel [(layers,) *inputs, *outputs]: per-head
    projections end in (heads, kv), every other kernel in one output axis."""
    outputs = 2 if axes[-1] == "kv" else 1
    return len(axes) - outputs - 1


class Pruner:
    """The masks of magnitude and N:M pruning, recomputed from the weights on the schedule's
    update steps (`axes`, `shapes`: those of the masked parameters, by 'a/b/c' name)."""

    def __init__(self, settings, axes: dict[str, tuple], shapes: dict[str, tuple]):
        self.settings, self.axes, self.shapes = settings, axes, shapes
        if settings.method == "nm":
            self._check_groups()

    def _check_groups(self) -> None:
        m = self.settings.m
        for name, axes in self.axes.items():
            if len(axes) - (axes[0] == "layers") < 2:
                raise ValueError(f"prune.method='nm' groups a kernel's inputs; prune.targets="
                                 f"{self.settings.targets!r} matches {name} {self.shapes[name]}")
            size = self.shapes[name][input_axis(axes)]
            if size % m:
                raise ValueError(f"prune.m={m} does not divide the {size} inputs of {name}")

    def recompute(self, params, step) -> dict:
        """The masks (a nested dict of the masked parameters) at `step` from the weights `params`."""
        flat, _ = tree.split(params, self.axes.__contains__)
        flat = flax.traverse_util.flatten_dict(flat, sep="/")
        if self.settings.method == "nm":
            masks = {n: self._nm_mask(w, input_axis(self.axes[n])) for n, w in flat.items()}
        elif self.settings.scope == "global":
            masks = self._global_masks(flat, scheduled_sparsity(self.settings, step))
        else:
            masks = self._layer_masks(flat, scheduled_sparsity(self.settings, step))
        return flax.traverse_util.unflatten_dict(masks, sep="/")

    def _layer_masks(self, flat: dict, target: jax.Array) -> dict:
        """Each kernel (each layer of a stacked kernel) loses round(target * its size) weights."""
        masks = {}
        for name, w in flat.items():
            rows = w.shape[0] if self.axes[name][0] == "layers" else 1
            magnitudes = jnp.abs(w).reshape(rows, -1)
            drop = jnp.round(target * magnitudes.shape[1]).astype(jnp.int32)
            masks[name] = keep_largest(magnitudes, drop).reshape(w.shape)
        return masks

    @staticmethod
    def _global_masks(flat: dict, target: jax.Array) -> dict:
        """The round(target * total) smallest weights over all target kernels go."""
        names = list(flat)
        magnitudes = jnp.concatenate([jnp.abs(flat[n]).astype(jnp.float32).ravel() for n in names])
        keep = keep_largest(magnitudes, jnp.round(target * magnitudes.size).astype(jnp.int32))
        pieces = jnp.split(keep, np.cumsum([flat[n].size for n in names])[:-1])
        return {n: piece.reshape(flat[n].shape) for n, piece in zip(names, pieces)}

    def _nm_mask(self, w: jax.Array, axis: int) -> jax.Array:
        n, m = self.settings.n, self.settings.m
        magnitudes = jnp.moveaxis(jnp.abs(w), axis, -1)
        groups = magnitudes.reshape(*magnitudes.shape[:-1], -1, m)
        keep = keep_largest(groups, m - n).reshape(magnitudes.shape)
        return jnp.moveaxis(keep, -1, axis)


# --- The optimizer that prunes ------------------------------------------------------------------

class PruneState(NamedTuple):
    inner_state: Any  # the wrapped optimizer's state
    masks: Any  # params-shaped: a bool mask per pruned parameter, optax.MaskedNode() elsewhere
    count: jax.Array  # updates done: the step the masks are for
    metrics: dict  # {'sparsity': of `masks`}, logged by the train step


def optimizer(tx: optax.GradientTransformation, config, task,
              partitioner) -> optax.GradientTransformation:
    """`tx` pruned as `config.prune` says (`tx` itself for method 'none').

    The masks live in the returned transformation's state (`PruneState`); `start` fills them
    before a fresh run's first step. Errors name the `prune.*` key that cannot work with this
    model (`task.init` is traced under the partitioner for the parameters' logical axes).
    """
    check(config)
    if config.prune.method == "none":
        return tx
    axes, shapes = masked_axes(config, task, partitioner, warn=True)
    return masked(tx, Pruner(config.prune, axes, shapes))


def masked(tx: optax.GradientTransformation, pruner: Pruner) -> optax.GradientTransformation:
    """`tx` with `pruner`'s masks: gradients masked before `tx`, pruned weights kept exactly zero
    by the updates, and (magnitude, N:M) the masks of the next step recomputed on its schedule."""
    settings = pruner.settings
    scheduled = settings.method in ("magnitude", "nm")

    def init(params):
        named = {n: jnp.ones(shape, jnp.bool_) for n, shape in pruner.shapes.items()}
        # optax.tree_map_params calls this with a placeholder for `params`: `masks` is one then
        return PruneState(inner_state=tx.init(params), masks=_shaped(named, params),
                          count=jnp.zeros((), jnp.int32),
                          metrics={"sparsity": jnp.zeros((), jnp.float32)})

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("pruning needs the parameters in update(): it keeps pruned ones at zero")
        updates, inner_state = tx.update(apply(state.masks, grads), state.inner_state, params)
        count = state.count + 1
        following = state.masks
        if scheduled:  # the weights the next step starts from, as the masks of this one leave them
            stepped = apply(state.masks, optax.apply_updates(params, updates))
            recompute = lambda: _shaped(
                flax.traverse_util.flatten_dict(pruner.recompute(stepped, count), sep="/"), params)
            following = jax.lax.cond(is_update_step(settings, count), recompute, lambda: state.masks)
        keep = jax.tree.map(lambda a, b: a if _is_hole(a) else a & b, state.masks, following,
                            is_leaf=_is_hole)
        updates = jax.tree.map(lambda m, u, p: u if _is_hole(m) else jnp.where(m, u, -p),
                               keep, updates, params, is_leaf=_is_hole)
        return updates, PruneState(inner_state=inner_state, masks=following, count=count,
                                   metrics={"sparsity": sparsity(following)})

    return optax.GradientTransformation(init, update)


# --- Heads and neurons: importance at the start, export of the smaller model -------------------

def _unit_of(name: str) -> tuple[str, str]:
    """(layer, unit kind): ('encoder/layers_0', 'heads') for 'encoder/layers_0/attn/query/kernel'."""
    for unit, pattern in UNIT_PARAMS.items():
        found = re.search(pattern, name)
        if found:
            return name[:found.start()], unit
    raise ValueError(f"{name} holds no attention head or MLP neuron")


def _kept_axes(axes: tuple, unit: str) -> tuple[int, ...]:
    """The axes a unit's score keeps: the layer stack's (if any) and the unit's own (a head of
    multi-head attention owns its key and value head too)."""
    own = ("heads", "kv_heads") if unit == "heads" else (unit,)
    return tuple(i for i, a in enumerate(axes) if a == "layers" or a in own)


def unit_scores(axes: dict, params: dict, grads: dict) -> dict:
    """(layer, unit) -> sum(w * dL/dw) over each unit's weights, [units] or [layers, units]."""
    scores = {}
    for name, ax in axes.items():
        layer, unit = _unit_of(name)
        kept = _kept_axes(ax, unit)
        contribution = jnp.sum(params[name] * grads[name], axis=tuple(i for i in range(len(ax)) if i not in kept))
        scores[layer, unit] = scores.get((layer, unit), 0.0) + contribution
    return scores


def importance(run, state, axes: dict) -> dict:
    """(layer, unit) -> mean over `prune.importance_batches` train batches of |sum(w * dL/dw)|.

    The batches come from a fresh train iterator (the run's own is not advanced); dropout is off.
    """
    task = run.task

    def batch_scores(params, frozen, batch):
        loss = lambda p: task.loss(tree.join(p, frozen) if frozen else p, batch, None, train=False)[0]
        grads = flax.traverse_util.flatten_dict(jax.grad(loss)(params), sep="/")
        flat = flax.traverse_util.flatten_dict(params, sep="/")
        return {f"{layer}|{unit}": jnp.abs(s) for (layer, unit), s in unit_scores(axes, flat, grads).items()}

    score = run.partitioner.jit(batch_scores, out_shardings=run.partitioner.replicated)
    batches = task.train_iterator()
    count = run.config.prune.importance_batches
    total = {}
    for _ in range(count):
        scores = jax.device_get(score(state.params, state.frozen, run.partitioner.shard_batch(next(batches))))
        total = {k: total.get(k, 0.0) + v / count for k, v in scores.items()}
    return {tuple(k.split("|")): v for k, v in total.items()}


def unit_masks(p, axes: dict, shapes: dict, scores: dict) -> dict:
    """Flat 'a/b/c' masks that drop each layer's lowest-scored heads and neurons."""
    fractions = _fractions(p)
    keep = {}
    for (layer, unit), score in scores.items():
        rank = np.argsort(np.argsort(score, axis=-1, kind="stable"), axis=-1, kind="stable")
        keep[layer, unit] = rank >= _dropped(fractions[unit], score.shape[-1])
    masks = {}
    for name, ax in axes.items():
        layer, unit = _unit_of(name)
        shape = [size if i in _kept_axes(ax, unit) else 1 for i, size in enumerate(shapes[name])]
        masks[name] = np.broadcast_to(keep[layer, unit].reshape(shape), shapes[name])
    return masks


def start(run, state):
    """A fresh run's state before its first step, the masks of step 0 filled in and applied to the
    loaded weights: method 'heads' scores the heads and neurons and fixes the masks; magnitude
    and N:M prune at step 0 when `prune.begin_step` is 0 (later, in the optimizer's updates).
    A state without pruning (or with nothing to do at step 0) comes back as it is."""
    p = run.config.prune
    if not isinstance(state.opt_state, PruneState) or (p.method != "heads" and p.begin_step != 0):
        return state
    axes, shapes = masked_axes(run.config, run.task, run.partitioner)
    if p.method == "heads":
        named = unit_masks(p, axes, shapes, importance(run, state, axes))
    else:
        recompute = run.partitioner.jit(Pruner(p, axes, shapes).recompute)
        first = recompute(state.params, jnp.zeros((), jnp.int32))
        named = flax.traverse_util.flatten_dict(first, sep="/")
    shardings = run.shardings.opt_state
    masks = jax.device_put(_shaped(named, state.params), shardings.masks)
    params = run.partitioner.jit(apply, out_shardings=run.shardings.params)(masks, state.params)
    metrics = run.partitioner.jit(lambda m: {"sparsity": sparsity(m)},
                                  out_shardings=shardings.metrics)(masks)
    log.info("pruned at the start: %.1f%% of the masked weights", 100 * float(metrics["sparsity"]))
    return state.replace(params=params, opt_state=state.opt_state._replace(masks=masks, metrics=metrics))


def smaller_params(axes: dict, params: dict, masks: dict) -> tuple[dict, dict]:
    """(params with the masked heads and neurons cut out, the `model` config they need).

    `params` and `masks` are nested host (numpy) trees; every layer keeps the same count.
    """
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    flat_masks = flax.traverse_util.flatten_dict(masks, sep="/")
    kept = {}
    for name, ax in axes.items():
        layer, unit = _unit_of(name)
        if (layer, unit) not in kept:
            mask = np.asarray(flat_masks[name])
            others = tuple(i for i in range(mask.ndim) if i not in _kept_axes(ax, unit))
            rows = np.atleast_2d(mask.any(axis=others))  # [layers or 1, units]
            kept[layer, unit] = [np.flatnonzero(r) for r in rows]
    counts = {}
    for (layer, unit), rows in kept.items():
        counts.setdefault(unit, set()).update(len(r) for r in rows)
    for unit, sizes in counts.items():
        if len(sizes) != 1:
            raise ValueError(f"the layers keep different numbers of {unit} ({sorted(sizes)}): one "
                             "model config cannot hold them")
    kept = {key: np.stack(rows) for key, rows in kept.items()}
    for name, ax in axes.items():
        layer, unit = _unit_of(name)
        flat[name] = _take_units(np.asarray(flat[name]), kept[layer, unit], ax, unit)
    names = {"heads": "num_heads", "mlp": "mlp_dim"}
    model = {names[unit]: sizes.pop() for unit, sizes in counts.items()}
    return flax.traverse_util.unflatten_dict(flat, sep="/"), model


def _take_units(w: np.ndarray, kept: np.ndarray, axes: tuple, unit: str) -> np.ndarray:
    """`w` keeping the units `kept` [layers or 1, k] along its `unit` axis (per layer if stacked)."""
    axis = next(i for i in _kept_axes(axes, unit) if axes[i] != "layers")
    if axes[0] != "layers":
        return np.take(w, kept[0], axis=axis)
    shape = [1] * w.ndim
    shape[0], shape[axis] = kept.shape
    return np.take_along_axis(w, kept.reshape(shape), axis=axis)
