"""The mesh and the logical-axis rules, held together by one object.

`nn.with_logical_constraint` is a silent no-op unless a mesh and rules are in context, so every
jitted function of a run is built through `Partitioner.jit`, which traces it inside both.
"""

import contextlib
import functools

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "stage")


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
    """Axis sizes from `config.mesh`; one axis may be -1 to take the devices left over."""
    sizes = [int(mesh_config[a]) for a in MESH_AXES]
    fill = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
    if len(fill) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {fill}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if fill:
        if num_devices % known:
            raise ValueError(f"the mesh {dict(zip(MESH_AXES, sizes))} cannot fill {num_devices} devices")
        sizes[MESH_AXES.index(fill[0])] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                         f"but there are {num_devices}")
    return tuple(sizes)


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
    if devices is None:
        devices = jax.devices()
        if mesh_config.num_devices:
            if mesh_config.num_devices > len(devices):
                raise ValueError(f"mesh.num_devices={mesh_config.num_devices} but only "
                                 f"{len(devices)} devices exist")
            devices = devices[:mesh_config.num_devices]
    shape = mesh_shape(mesh_config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(shape),
                         devices=devices)


def axes_tuple(axes) -> tuple:
    """A rule's or a PartitionSpec entry's mesh axes (None, a name or names) as a tuple."""
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def validate_rules(rules) -> tuple:
    rules = tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
                  for name, axes in rules)
    for name, axes in rules:
        for axis in axes_tuple(axes):
            if axis not in MESH_AXES:
                raise ValueError(f"mesh.rules maps {name!r} to unknown mesh axis {axis!r}; "
                                 f"mesh axes are {MESH_AXES}")
    return rules


def sequence_parallel(rules) -> tuple:
    """`rules` with the residual stream's tokens also sharded over `tensor` (Megatron's sequence
    parallelism: what runs outside attention and the MLP is split over the tensor group too)."""
    rules = validate_rules(rules)
    if "residual" not in dict(rules):
        raise ValueError("mesh.sequence_parallel needs a 'residual' rule in mesh.rules")
    widen = lambda axes: tuple(a for a in axes_tuple(axes) if a != "tensor") + ("tensor",)
    return tuple((name, widen(axes) if name == "residual" else axes) for name, axes in rules)


class Partitioner:
    """Owns the mesh and rules; turns logical specs into shardings and jits inside both."""

    def __init__(self, mesh: jax.sharding.Mesh, rules):
        self.mesh = mesh
        self.rules = validate_rules(rules)

    @classmethod
    def from_config(cls, config, devices=None) -> "Partitioner":
        rules = config.mesh.rules
        if config.mesh.sequence_parallel:
            rules = sequence_parallel(rules)
        return cls(make_mesh(config.mesh, devices), rules)

    @contextlib.contextmanager
    def context(self):
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def sharding(self, logical_axes) -> NamedSharding:
        spec = nn.logical_to_mesh_axes(logical_axes, self.rules)
        return NamedSharding(self.mesh, spec)

    def shardings_of(self, boxed_tree):
        """NamedShardings for a tree of `nn.LogicallyPartitioned` (or plain) abstract values.

        Raises naming the parameter when a dimension does not divide over its mesh axes.
        """
        specs = nn.get_partition_spec(boxed_tree)
        shardings = nn.logical_to_mesh_sharding(specs, self.mesh, self.rules)
        is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
        for (path, leaf), sharding in zip(
                jax.tree_util.tree_leaves_with_path(boxed_tree, is_leaf=is_box),
                jax.tree.leaves(shardings)):
            self._check_divisible(jax.tree_util.keystr(path), leaf, sharding)
        return shardings

    def _check_divisible(self, name, leaf, sharding) -> None:
        names = leaf.names if isinstance(leaf, nn.LogicallyPartitioned) else ()
        shape = nn.unbox(leaf).shape
        for dim, (size, axes) in enumerate(zip(shape, sharding.spec)):
            axes = axes_tuple(axes)
            parts = self.devices_over(axes)
            if size % parts:
                logical = names[dim] if dim < len(names) else None
                raise ValueError(
                    f"cannot shard {name} of shape {shape}: dimension {dim} ({logical!r}, size "
                    f"{size}) does not divide over mesh axes {axes} ({parts} devices). Change the "
                    f"mesh or mesh.rules{', or set model.vocab_multiple' if logical == 'vocab' else ''}.")

    def devices_over(self, axes) -> int:
        """How many devices the mesh axes `axes` (None, a name or names) span."""
        return int(np.prod([self.mesh.shape[a] for a in axes_tuple(axes)]))

    @property
    def batch_shards(self) -> int:
        """How many ways the `batch` logical axis splits over the mesh (data x fsdp by default)."""
        return self.devices_over(self.sharding(("batch",)).spec[0])

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def jit(self, fn, **jit_kwargs):
        """`jax.jit(fn)` whose tracing, compiling and calls happen inside the mesh and rules."""
        jitted = jax.jit(fn, **jit_kwargs)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            with self.context():
                return jitted(*args, **kwargs)

        call.lower = lambda *a, **k: _in_context(self, jitted.lower, *a, **k)
        return call

    def shard_batch(self, local_batch: dict, logical_axes=("batch",)) -> dict:
        """Per-process numpy arrays -> global jax.Arrays sharded along `batch`.

        Stacks of batches [k, batch, ...] pass `logical_axes=(None, "batch")`.
        """
        sharding = self.sharding(logical_axes)
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x),
                            local_batch)


def _in_context(partitioner, fn, *args, **kwargs):
    with partitioner.context():
        return fn(*args, **kwargs)
