"""Orbax checkpoints of {state, data iterator} in `WORKDIR/checkpoints`.

Restore order: this run's latest checkpoint, then `config.init_from` (parameters only), then
scratch. Orbax writes each step into a temporary directory and renames it when complete, so a
failed or interrupted save never leaves a half-written step behind, and an existing step is never
overwritten.

The data iterator is saved per process (Grain writes `process_I-of-N.json`); `DataIterHandler`
also resumes it with another process count (see there). The state alone restores anywhere.
"""

import dataclasses
import json
import os
from typing import Any

import flax
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

STATE, DATA = "state", "data_iter"
# Arrays that earlier jaxlm versions saved elsewhere in the state: name prefix -> what changed.
MOVED = {"masks.": "pruning masks moved from the train state (state.masks) into the optimizer "
                   "state (state.opt_state.masks, jaxlm/compress/prune.py)"}


class Checkpointer:
    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True, read_only: bool = False):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep or None, enable_async_checkpointing=async_save, read_only=read_only,
            create=not read_only)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={STATE: ocp.StandardCheckpointHandler(), DATA: DataIterHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iter=None) -> None:
        items = {STATE: ocp.args.StandardSave(state.saved())}
        if data_iter is not None:
            items[DATA] = DataIterSave(data_iter)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, abstract_state, data_iter=None, step: int | None = None):
        """Restores `step` (default: latest) onto the shardings in `abstract_state`; the frozen
        parameters are not in checkpoints: the state comes back with `frozen={}`.

        The iterator, if given, is moved to the saved position in place (a checkpoint written
        without one, e.g. by `tools/convert_hf.py import`, leaves it at the start).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract_state = abstract_state.saved()
        self.check_shapes(step, abstract_state)
        items = {STATE: ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None and DATA in self.manager.item_metadata(step):
            items[DATA] = DataIterRestore(data_iter)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except DataIterMismatch:
            raise
        except Exception as e:
            raise RuntimeError(
                f"cannot restore checkpoint step {step} from {self.directory}: {e}. The checkpoint "
                "was left untouched; move it away to start from the previous one.") from e
        return restored[STATE]

    def check_shapes(self, step: int, abstract_state) -> None:
        """Raises naming the arrays whose saved shape differs from what the config builds."""
        saved = _saved_shapes(self.manager, step)
        wanted = _shapes(abstract_state)
        for prefix, change in MOVED.items():
            if any(n.startswith(prefix) for n in saved) and not any(n.startswith(prefix) for n in wanted):
                raise ValueError(
                    f"checkpoint step {step} in {self.directory} was written by an earlier jaxlm: "
                    f"{change}. It cannot resume here; its parameters still load (init_from, "
                    "jaxlm.evaluate, jaxlm.predict). The checkpoint was left untouched.")
        problems = [f"{name}: saved {saved.get(name, 'nothing')}, this config {shape}"
                    for name, shape in _differing(saved, wanted)]
        problems += [f"{name}: saved {shape}, this config has no such array"
                     for name, shape in saved.items() if name not in wanted]
        if problems:
            shown = "\n  ".join(sorted(problems, key=lambda p: not p.startswith("params"))[:8])
            raise ValueError(
                f"checkpoint step {step} in {self.directory} does not fit this config "
                f"({len(problems)} arrays differ):\n  {shown}\nUse the config it was written "
                "with, or another workdir; the checkpoint was left untouched.")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class DataIterHandler(grain.checkpoint.CheckpointHandler):
    """Grain's handler (one `process_I-of-N.json` per process), able to resume with another N.

    jaxlm's pipelines make the global batches independent of the process count and every
    process reads the same number of them, so when all saved positions agree, that position is
    valid for any process count. Positions that disagree are an error naming the problem.
    """

    def restore(self, directory, item=None, args=None):
        item = item or args.item
        if (directory / _iterator_file(jax.process_index(), jax.process_count())).exists():
            return super().restore(directory, item=item)
        item.set_state(common_iterator_state(directory))
        item.start_prefetch()
        return item


@ocp.args.register_with_handler(DataIterHandler, for_save=True)
@dataclasses.dataclass
class DataIterSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(DataIterHandler, for_restore=True)
@dataclasses.dataclass
class DataIterRestore(ocp.args.CheckpointArgs):
    item: Any


class DataIterMismatch(ValueError):
    """The saved data iterator positions cannot continue in this run's processes."""


def common_iterator_state(directory) -> dict:
    """The one data-iterator position that all processes of the saving run wrote."""
    files = sorted(directory.glob("process_*-of-*.json"))
    if not files:
        raise FileNotFoundError(f"no data iterator state in {directory}")
    states = [json.loads(f.read_text()) for f in files]
    if any(state != states[0] for state in states):
        raise DataIterMismatch(
            f"the data iterator state in {directory} was saved by {len(files)} processes at "
            f"different positions, so a run of {jax.process_count()} cannot resume it; resume with "
            f"{len(files)} processes, or restore only the parameters (init_from, jaxlm.evaluate)")
    return states[0]


def _iterator_file(process_index: int, process_count: int) -> str:
    return f"process_{process_index}-of-{process_count}.json"  # grain's name for it


def restore_params(workdir: str, abstract_params) -> tuple[dict, int]:
    """(params, step): the parameters of the latest checkpoint in a jaxlm workdir (`init_from`'s,
    or a run's own for inference) that `abstract_params` also has, as a nested dict; parameters
    it lacks (new heads) are left out.

    Only the parameters are read, so the source run may have used another optimizer; a
    parameter whose shape differs is an error that names it.
    """
    source = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(read_only=True, create=False),
        item_handlers={STATE: ocp.PyTreeCheckpointHandler()})
    try:
        step = source.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
        saved = _saved_shapes(source, step)
        dtypes = {m.name: m.dtype for m in jax.tree.leaves(source.item_metadata(step)[STATE])}
        present = {}
        for path, leaf in flax.traverse_util.flatten_dict(flax.core.unfreeze(abstract_params)).items():
            name = _dotted(("params",) + path)
            if name in saved and saved[name] != tuple(leaf.shape):
                raise ValueError(f"init_from {workdir} step {step}: {name} is saved as "
                                 f"{saved[name]}, this config builds {tuple(leaf.shape)}")
            if name in saved and _quantized_into_float(dtypes[name], leaf.dtype):
                raise ValueError(f"init_from {workdir} step {step}: {name} holds quantized "
                                 f"{dtypes[name]} codes, this config builds {leaf.dtype} weights "
                                 "(set model.quant as the source run does)")
            if name in saved:  # as saved (float weights for a quantized model get quantized after)
                present[path] = jax.ShapeDtypeStruct(leaf.shape, dtypes[name], sharding=getattr(leaf, "sharding", None))
        if not present:
            raise ValueError(f"init_from {workdir} step {step}: none of this model's parameters "
                             "are in its checkpoint")
        item = {"params": flax.traverse_util.unflatten_dict(present)}
        restored = source.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True)}))
        return restored[STATE]["params"], step
    finally:
        source.close()


def _quantized_into_float(saved_dtype, wanted_dtype) -> bool:
    return not np.issubdtype(np.dtype(saved_dtype), np.floating) and np.issubdtype(np.dtype(wanted_dtype), np.floating)


def _saved_shapes(manager, step: int) -> dict:
    return {m.name: tuple(m.shape) for m in jax.tree.leaves(manager.item_metadata(step)[STATE])}


def _shapes(tree) -> dict:
    return {_dotted(path): tuple(x.shape) for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def _differing(saved: dict, wanted: dict) -> list[tuple[str, tuple]]:
    """(name, wanted shape) of the arrays whose saved shape is not the wanted one."""
    return [(name, shape) for name, shape in wanted.items() if saved.get(name) != shape]


def _dotted(path) -> str:
    """`opt_state.1.0.mu.decoder.kernel`: the names Orbax gives saved arrays."""
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
