"""The jitted train and eval steps. The loss comes from the task; the trainer only sums."""

import jax
import jax.numpy as jnp
import optax

from jaxlm import tree
from jaxlm.train.state import TrainState


def split_microbatches(batch: dict, microbatches: int) -> dict:
    def split(x):
        if x.shape[0] % microbatches:
            raise ValueError(f"batch of {x.shape[0]} does not split into "
                             f"train.microbatches={microbatches}")
        return x.reshape(microbatches, x.shape[0] // microbatches, *x.shape[1:])
    return jax.tree.map(split, batch)


def grads_and_sums(task, params, batch, rng, microbatches: int, frozen=None):
    """Summed loss gradients of `params` and metric sums, accumulated over `microbatches` pieces
    (`frozen` parameters are constants of the loss)."""
    grad_fn = jax.grad(lambda p, b, r: task.loss(tree.join(p, frozen) if frozen else p, b, r, train=True),
                       has_aux=True)
    if microbatches == 1:
        return grad_fn(params, batch, rng)

    def accumulate(carry, xs):
        grads, sums = carry
        micro, i = xs
        g, s = grad_fn(params, micro, jax.random.fold_in(rng, i))
        return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums, s)), None

    micro = split_microbatches(batch, microbatches)
    first = jax.tree.map(lambda x: x[0], micro)
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, first, rng))
    (grads, sums), _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(microbatches)))
    return grads, sums


def make_train_step(task, tx, lr_schedule, *, seed: int, microbatches: int = 1,
                    skip_nonfinite: bool = False):
    """Returns `train_step(state, batch) -> (state, metrics)`.

    The dropout rng is `fold_in(key(seed), step)`, so a resumed run draws the same masks.
    Figures an optimizer transformation keeps in a `metrics` field of its state (pruning's
    sparsity) are logged with the step's.
    """
    base_rng = jax.random.key(seed)

    def train_step(state: TrainState, batch: dict):
        rng = jax.random.fold_in(base_rng, state.step)
        grads, sums = grads_and_sums(task, state.params, batch, rng, microbatches, state.frozen)
        grads = jax.tree.map(lambda g: g / jnp.maximum(sums["weight"], 1.0), grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        metrics = dict(task.summarize(sums))
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["learning_rate"] = lr_schedule(state.step)
        metrics.update(optax.tree_utils.tree_get(state.opt_state, "metrics", default={}))  # this step's
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        if skip_nonfinite:
            # A finite loss and gradient can still give inf/NaN parameters (a huge learning rate)
            # or moments; skipping needs to know per step (a pass over the state: ~2-10% of a
            # small model's step, so 'stop' checks the state only when it logs or saves).
            finite &= all_finite((new.params, new.opt_state))
            keep_old = lambda n, o: jnp.where(finite, n, o)
            new = new.replace(params=jax.tree.map(keep_old, new.params, state.params),
                              opt_state=jax.tree.map(keep_old, new.opt_state, state.opt_state))
        metrics["finite"] = finite
        return new, metrics

    return train_step


def all_finite(tree) -> jax.Array:
    """True when every floating-point value of `tree` is finite."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves])) if leaves else jnp.array(True)


def repeat_steps(train_step):
    """Runs `train_step` over a stack of batches [k, ...] in one call; metrics come back [k].

    A stack of one is a plain call, not a loop: XLA:CPU runs convolution gradients inside a
    while loop about 20x slower than outside one (measured on the MNIST CNN).
    """
    def steps(state, batches):
        if len(jax.tree.leaves(batches)[0]) == 1:
            state, metrics = train_step(state, jax.tree.map(lambda x: x[0], batches))
            return state, jax.tree.map(lambda x: x[None], metrics)
        return jax.lax.scan(train_step, state, batches)
    return steps


def make_eval_step(task):
    """Returns `eval_step(params, batch) -> metric sums` (summed, to be added over batches)."""
    def eval_step(params, batch):
        _, sums = task.loss(params, batch, train=False)
        return sums
    return eval_step
