"""Optax optimizer from `config.optim`: AdamW, warmup + decay schedule, clipping, decay mask."""

import jax
import optax

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


def make(optim, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    lr = schedule(optim, total_steps)
    adamw = optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                        weight_decay=optim.weight_decay, mask=decay_mask)
    if optim.clip_norm > 0:
        adamw = optax.chain(optax.clip_by_global_norm(optim.clip_norm), adamw)
    return adamw, lr
