"""Optax optimizer from `config.optim`: AdamW, warmup + decay schedule, clipping, decay mask,
layer-wise learning-rate decay."""

import jax
import numpy as np
import optax

from jaxlm.models.transformer import LAYER

DECAYED = ("kernel", "embedding", "pos_embedding")


def schedule(optim, total_steps: int) -> optax.Schedule:
    decay_steps = optim.decay_steps or total_steps
    if optim.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, optim.lr, optim.warmup_steps, max(decay_steps, optim.warmup_steps + 1), optim.end_lr)
    if optim.schedule == "linear":
        return optax.join_schedules([
            optax.linear_schedule(0.0, optim.lr, optim.warmup_steps),
            optax.linear_schedule(optim.lr, optim.end_lr, max(decay_steps - optim.warmup_steps, 1)),
        ], [optim.warmup_steps])
    if optim.schedule == "constant":
        return optax.join_schedules([
            optax.linear_schedule(0.0, optim.lr, optim.warmup_steps), optax.constant_schedule(optim.lr)
        ], [optim.warmup_steps])
    raise ValueError(f"optim.schedule={optim.schedule!r}: expected 'cosine', 'linear' or 'constant'")


def decay_mask(params):
    """Weight decay on matrices (kernels, embeddings), never on norm scales or biases."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key in DECAYED, params)


def layer_depths(params) -> tuple:
    """(depths, D): each parameter's depth in the network, for `layer_decay`: 0 for the inputs'
    tables (a top-level name with "embed" in it, ViT's "cls"), i + 1 in layer i of a stack
    (`layers_i`, or an int array [L, 1, ...] along the leading axis of a scanned stack's
    `layers`), and D = L + 1 for the rest (pooler, heads, final norms), L the deepest stack's
    layer count."""
    def depth(path, leaf):
        names = [str(getattr(p, "key", "")) for p in path]
        if "layers" in names:
            return np.arange(1, leaf.shape[0] + 1).reshape((-1,) + (1,) * (leaf.ndim - 1))
        index = next((int(m.group(1)) for n in names if (m := LAYER.match(n))), None)
        if index is not None:
            return np.array(index + 1)
        return np.array(0 if "embed" in names[0] or names[0] == "cls" else -1)

    depths = jax.tree_util.tree_map_with_path(depth, params)
    top = 1 + max((int(d.max()) for d in jax.tree.leaves(depths)), default=0)
    return jax.tree.map(lambda d: np.where(d < 0, top, d), depths), top


def scale_by_layer_decay(decay: float) -> optax.GradientTransformation:
    """Layer-wise learning-rate decay (ELECTRA, Clark et al. 2020): the update of a parameter at
    depth d of D (`layer_depths`) times decay ** (D - d), so the heads learn at the full rate and
    the layers below ever more slowly: fine-tuning keeps more of what pretraining put low down."""
    def update(updates, state, params=None):
        depths, top = layer_depths(updates)
        return jax.tree.map(lambda u, d: u * (decay ** (top - d)).astype(u.dtype), updates, depths), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make(optim, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    lr = schedule(optim, total_steps)
    adamw = optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                        weight_decay=optim.weight_decay, mask=decay_mask)
    if optim.layer_decay != 1.0:
        adamw = optax.chain(adamw, scale_by_layer_decay(optim.layer_decay))
    if optim.clip_norm > 0:
        adamw = optax.chain(optax.clip_by_global_norm(optim.clip_norm), adamw)
    return adamw, lr
