"""The train state and its sharded initialization.

Abstract init (`jax.eval_shape`) gives the logical axes of every parameter; the rules turn them
into NamedShardings; a jitted init with those out_shardings then creates every array directly
in its sharded layout, so no device ever holds the full model.
"""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def shardings(partitioner, task, tx) -> TrainState:
    """NamedShardings of the train state, from the model's logical axis annotations."""
    with partitioner.context():
        boxed = jax.eval_shape(lambda: task.init(jax.random.key(0))["params"])
    params = partitioner.shardings_of(boxed)
    abstract_params = nn.unbox(boxed)
    opt_state = jax.eval_shape(tx.init, abstract_params)
    opt = optax.tree_map_params(tx, lambda _, s: s, opt_state, params,
                                transform_non_params=lambda _: partitioner.replicated)
    return TrainState(step=partitioner.replicated, params=params, opt_state=opt)


def _init_fn(task, tx):
    def init_fn(rng):
        params = nn.unbox(task.init(rng)["params"])
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    return init_fn


def init(partitioner, task, tx, rng: jax.Array, state_shardings: TrainState) -> TrainState:
    return partitioner.jit(_init_fn(task, tx), out_shardings=state_shardings)(rng)


def abstract(partitioner, task, tx, state_shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs with shardings: the restore target for Orbax on any mesh."""
    with partitioner.context():
        shapes = jax.eval_shape(_init_fn(task, tx), jax.random.key(0))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, state_shardings)
