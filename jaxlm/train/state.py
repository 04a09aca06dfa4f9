"""The train state and its sharded initialization.

Abstract init (`jax.eval_shape`) gives the logical axes of every parameter; the rules turn them
into NamedShardings; a jitted init with those out_shardings then creates every array directly
in its sharded layout, so no device ever holds the full model.

Fine-tuning splits the parameters (`jaxlm.peft`): `params` holds those that train (with optimizer
state, in checkpoints), `frozen` the rest (loaded from `init_from` at start, never saved).
Parameter-shaped trees in the optimizer state (Adam's moments, pruning masks) are sharded like
the parameters; a tree with holes (`optax.MaskedNode`, as `optax.masked` and pruning leave for
the parameters they skip) keeps them.
"""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxlm import tree


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # the trainable parameters (all of them unless a PEFT method freezes some)
    opt_state: Any
    frozen: Any = flax.struct.field(default_factory=dict)

    @property
    def model_params(self):
        """The whole parameter tree the model applies."""
        return tree.join(self.params, self.frozen) if self.frozen else self.params

    def saved(self) -> "TrainState":
        """What a checkpoint holds: everything but the frozen parameters."""
        return self.replace(frozen={})


def shardings(partitioner, task, tx) -> TrainState:
    """NamedShardings of the train state, from the model's logical axis annotations."""
    with partitioner.context():
        boxed = jax.eval_shape(lambda: task.init(jax.random.key(0))["params"])
    params, frozen = tree.split(partitioner.shardings_of(boxed), task.trainable)
    abstract_params, _ = tree.split(nn.unbox(boxed), task.trainable)
    if not abstract_params:
        raise ValueError(f"peft: no parameter is trainable (method {task.config.peft.method!r}, "
                         f"peft.frozen={task.config.peft.frozen!r})")
    opt_state = jax.eval_shape(tx.init, abstract_params)
    hole = lambda x: isinstance(x, optax.MaskedNode)
    opt = optax.tree_map_params(tx, lambda x, s: x if hole(x) else s, opt_state, params,
                                transform_non_params=lambda _: partitioner.replicated, is_leaf=hole)
    return TrainState(step=partitioner.replicated, params=params, opt_state=opt, frozen=frozen)


def _init_fn(task, tx):
    def init_fn(rng):
        params, frozen = tree.split(nn.unbox(task.init(rng)["params"]), task.trainable)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          frozen=frozen)
    return init_fn


def init(partitioner, task, tx, rng: jax.Array, state_shardings: TrainState) -> TrainState:
    return partitioner.jit(_init_fn(task, tx), out_shardings=state_shardings)(rng)


def abstract(partitioner, task, tx, state_shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs with shardings: the restore target for Orbax on any mesh."""
    with partitioner.context():
        shapes = jax.eval_shape(_init_fn(task, tx), jax.random.key(0))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, state_shardings)
