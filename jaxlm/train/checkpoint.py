"""Orbax checkpoints of {state, data iterator} in `WORKDIR/checkpoints`, with checksums.

Restore order: this run's latest checkpoint, then `config.init_from` (parameters only), then
scratch. Orbax writes each step into a temporary directory and renames it when complete, so a
failed or interrupted save never leaves a half-written step behind, and an existing step is never
overwritten.

The data iterator is saved per process (Grain writes `process_I-of-N.json`); `DataIterHandler`
also resumes it with another process count (see there). The state alone restores anywhere.

Integrity. Orbax checks only part of what it reads (OCDBT's B-tree nodes and manifest carry
CRC-32C checksums; the array data and the JSON metadata do not), so 64 bytes overwritten in a
data file would restore silently. Each step therefore holds a manifest of its files:

    checkpoints/<step>/
      checksums.json         {"algorithm": "sha256", "files": {path: {"size": n, "sha256": hex}}}
      _CHECKPOINT_METADATA   not listed (Orbax rewrites it when it commits): checked to be JSON
      commit_success.txt     not listed (Orbax writes it when it commits): never read
      state/                 every file listed: _METADATA, _sharding, manifest.ocdbt, d/...,
                             ocdbt.process_I/..., array_metadatas/process_I, commit_success.txt
      data_iter/             every file listed: process_I-of-N.json, commit_success.txt

Process 0 writes it in Orbax's post-finalization callback, which runs once every process has
written its files and Orbax has merged them, before Orbax's commit (it rewrites
`_CHECKPOINT_METADATA`, writes `commit_success.txt` and renames the temporary folder): the
manifest is part of the atomic step, so a committed step always has one. `sha256sum` checks the
files too. A restore first verifies the step: every listed file present with its size and hash.
Other unlisted files are logged and ignored (Orbax reads only what its own metadata names). A
step without a manifest (an earlier jaxlm's) restores unverified, with a warning. Every failure
is a `CorruptCheckpoint` naming the step and the file, and so are Orbax's read errors of damaged
files (TensorStore's DATA_LOSS, invalid JSON, a missing file: what an unverified step shows);
other errors (out of memory, a bad sharding) are raised as they are and move nothing.

Fall-back: a restore of the latest step (`step=None`) that finds it corrupt tries the previous
steps, newest first. Once one restores, the corrupt newer ones are moved aside, never deleted, to
`WORKDIR/checkpoints.corrupt/<step>` (by process 0), so that the run's next saves continue from
the restored step. When none restores, nothing is moved and the error lists every step's problem
(a rerun fails the same way instead of silently starting from scratch). An explicit `step` never
falls back. A read-only `Checkpointer` and `restore_params` (another run's workdir) fall back the
same way but move nothing. Shapes that differ from the config are a config error, not corruption:
they raise at once and move nothing.
"""

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import re
from typing import Any

import flax
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger("jaxlm")

STATE, DATA = "state", "data_iter"
MANIFEST = "checksums.json"  # in each step folder
# What Orbax writes into a step folder after the manifest, when it commits the step.
WRITTEN_AT_COMMIT = ("_CHECKPOINT_METADATA", "commit_success.txt")
CORRUPT = "checkpoints.corrupt"  # WORKDIR/checkpoints.corrupt/<step>: the steps moved aside
# Arrays that earlier jaxlm versions saved elsewhere in the state: name prefix -> what changed.
MOVED = {"masks.": "pruning masks moved from the train state (state.masks) into the optimizer "
                   "state (state.opt_state.masks, jaxlm/compress/prune.py)"}


class CorruptCheckpoint(RuntimeError):
    """A checkpoint step whose files are not those that were written: names the step and file."""

    def __init__(self, directory: str, step: int, file: str, problem: str):
        super().__init__(f"checkpoint step {step} in {directory} is corrupt: {file} {problem}")
        self.step, self.file, self.problem = step, file, f"{file} {problem}"


class Checkpointer:
    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True, read_only: bool = False):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.async_save, self.read_only = async_save, read_only
        self._saving = None  # the step whose save is in flight, for `_write_manifest`
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep or None, read_only=read_only, create=not read_only,
            # Orbax's async checkpointer either way: only it calls back once a step is written
            # (when the manifest is written); a synchronous save waits for it (see `save`).
            enable_async_checkpointing=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._write_manifest))
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={STATE: ocp.StandardCheckpointHandler(), DATA: DataIterHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def step_folder(self, step: int) -> str:
        return os.path.join(self.directory, str(step))  # Orbax's default step names

    def save(self, step: int, state, data_iter=None) -> None:
        items = {STATE: ocp.args.StandardSave(state.saved())}
        if data_iter is not None:
            items[DATA] = DataIterSave(data_iter)
        self.manager.wait_until_finished()  # the previous step's callback is done with `_saving`
        self._saving = step
        # Recorded in _CHECKPOINT_METADATA, so that a lost manifest is told from an old step's.
        self.manager.save(step, args=ocp.args.Composite(**items), force=True,
                          custom_metadata={"checksums": MANIFEST})
        if not self.async_save:
            self.manager.wait_until_finished()

    def _write_manifest(self) -> None:
        """Orbax's post-finalization callback: on process 0, once every process has written its
        files, before Orbax commits the step (renames its temporary folder)."""
        final = self.step_folder(self._saving)
        tmp = final + ocp.path.atomicity_types.TMP_DIR_SUFFIX
        folder = next((f for f in (tmp, final) if os.path.isdir(f)), None)
        if folder is None:
            log.error("found no folder of checkpoint step %s in %s to write %s into; the step "
                      "will restore unverified", self._saving, self.directory, MANIFEST)
            return
        write_manifest(folder)

    def verify(self, step: int) -> bool:
        """True when `step`'s files are those its manifest lists, False when it has none (an
        earlier jaxlm's step, restorable unverified); raises `CorruptCheckpoint` otherwise."""
        return verify_folder(self.step_folder(step), self.directory, step)

    def restore(self, abstract_state, data_iter=None, step: int | None = None):
        """Restores `step` (default: latest) onto the shardings in `abstract_state`; the frozen
        parameters are not in checkpoints: the state comes back with `frozen={}`.

        The iterator, if given, is moved to the saved position in place (a checkpoint written
        without one, e.g. by `tools/convert_hf.py import`, leaves it at the start).

        The step's files are verified first. A corrupt `step` raises `CorruptCheckpoint`; a
        corrupt latest step (`step=None`) falls back to the newest one that restores, and the
        corrupt ones are moved to `WORKDIR/checkpoints.corrupt/` (see the module docstring).
        """
        if step is not None:
            return self._restore(step, abstract_state, data_iter)
        if not self.manager.all_steps():
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        state, restored, corrupt = _newest_that_restores(
            self.directory, self.manager.all_steps(),
            lambda candidate: self._restore(candidate, abstract_state, data_iter))
        self._set_aside(corrupt, restored=restored)
        return state

    def _restore(self, step: int, abstract_state, data_iter):
        if step not in self.manager.all_steps():
            raise FileNotFoundError(f"no checkpoint step {step} in {self.directory} (its steps: "
                                    f"{sorted(self.manager.all_steps())})")
        self.verify(step)
        abstract_state = abstract_state.saved()
        try:
            metadata = self.manager.item_metadata(step)
            saved = _shapes_in(metadata)
        except Exception as e:
            raise _read_error(e, self.directory, step) from e
        self.check_shapes(step, abstract_state, saved)
        items = {STATE: ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None and DATA in metadata:
            items[DATA] = DataIterRestore(data_iter)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except DataIterMismatch:
            raise
        except Exception as e:
            raise _read_error(e, self.directory, step) from e
        return restored[STATE]

    def _set_aside(self, corrupt: list, restored: int) -> None:
        """Moves the corrupt steps newer than `restored` to `WORKDIR/checkpoints.corrupt/`, so
        that this run's next saves continue from `restored`."""
        if not corrupt:
            return
        steps = [e.step for e in corrupt]
        if self.read_only:
            log.warning("restored checkpoint step %d of %s; its newer steps %s are corrupt and "
                        "were left in place (read-only)", restored, self.directory, steps)
            return
        if jax.process_index() == 0:
            where = os.path.join(os.path.dirname(self.directory), CORRUPT)
            for error in corrupt:
                target = move_aside(self.step_folder(error.step), where)
                log.warning("moved corrupt checkpoint step %d to %s (%s); restored step %d "
                            "instead", error.step, target, error.problem, restored)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"jaxlm checkpoint: moved aside {steps}")
        self.manager.reload()  # Orbax caches its list of steps

    def check_shapes(self, step: int, abstract_state, saved: dict | None = None) -> None:
        """Raises naming the arrays whose saved shape differs from what the config builds
        (`saved`: the step's `_saved_shapes`, if already read)."""
        saved = _saved_shapes(self.manager, step) if saved is None else saved
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


def restore_params(workdir: str, abstract_params, step: int | None = None) -> tuple[dict, int]:
    """(params, step): the parameters of the latest checkpoint in a jaxlm workdir (`init_from`'s,
    or a run's own for inference), or of checkpoint `step`, that `abstract_params` also has, as a
    nested dict; parameters it lacks (new heads) are left out.

    Only the parameters are read, so the source run may have used another optimizer; a
    parameter whose shape differs is an error that names it. The step is verified first; a
    corrupt latest step falls back to the newest one that restores, with a warning, moving
    nothing (the workdir may be another run's); when none restores, the error names each.
    """
    directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    source = _reader(directory)
    try:
        if not source.all_steps():
            raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
        if step is not None and step not in source.all_steps():
            raise FileNotFoundError(f"no checkpoint step {step} in {workdir}/checkpoints "
                                    f"(it has {sorted(source.all_steps())})")
        params, step, corrupt = _newest_that_restores(
            directory, source.all_steps() if step is None else [step],
            lambda candidate: _restore_params(source, candidate, workdir, abstract_params))
        if corrupt:
            log.warning("restored the parameters of checkpoint step %d of %s; its newer "
                        "steps %s are corrupt and were left in place", step, directory,
                        [e.step for e in corrupt])
        return params, step
    finally:
        source.close()


def saved_steps(workdir: str) -> list[int]:
    """The checkpoint steps of a jaxlm workdir, oldest first."""
    reader = _reader(os.path.abspath(os.path.join(workdir, "checkpoints")))
    try:
        return sorted(reader.all_steps())
    finally:
        reader.close()


def _reader(directory: str) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
                                 item_handlers={STATE: ocp.PyTreeCheckpointHandler()})


def _newest_that_restores(directory: str, steps, restore):
    """(what `restore(step)` gave, that step, the `CorruptCheckpoint`s of the newer steps) for the
    newest of `steps` that is not corrupt; raises listing every step's problem when none is."""
    corrupt = []
    for step in sorted(steps, reverse=True):
        try:
            return restore(step), step, corrupt
        except CorruptCheckpoint as e:
            log.warning("%s; trying the previous checkpoint", e)
            corrupt.append(e)
    raise _none_restores(directory, corrupt)


def _restore_params(source, step: int, workdir: str, abstract_params) -> dict:
    directory = str(source.directory)
    verify_folder(os.path.join(directory, str(step)), directory, step)
    try:
        metadata = source.item_metadata(step)
        saved = _shapes_in(metadata)
        dtypes = {m.name: m.dtype for m in jax.tree.leaves(metadata[STATE])}
    except Exception as e:
        raise _read_error(e, directory, step) from e
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
    try:
        restored = source.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True)}))
    except Exception as e:
        raise _read_error(e, directory, step) from e
    return restored[STATE]["params"]


def write_manifest(folder: str) -> None:
    """Writes `folder/checksums.json`: the size and SHA-256 of every file in the step folder
    `folder` but those Orbax writes when it commits (atomically: a temporary file, renamed)."""
    files = [rel for rel in _files(folder) if rel not in WRITTEN_AT_COMMIT]
    with concurrent.futures.ThreadPoolExecutor(_THREADS) as pool:  # hashlib releases the GIL
        entries = dict(zip(files, pool.map(lambda rel: _describe(os.path.join(folder, rel)), files)))
    tmp = os.path.join(folder, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"algorithm": "sha256", "files": entries}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, MANIFEST))


def verify_folder(folder: str, directory: str, step: int) -> bool:
    """True when the files of step folder `folder` are those its manifest lists, False when it
    has none (with a warning); raises `CorruptCheckpoint` naming the first file that differs."""
    listed = _read_manifest(folder, directory, step)
    files = _files(folder)
    if listed:
        with concurrent.futures.ThreadPoolExecutor(_THREADS) as pool:
            problems = [(rel, p) for rel, p in zip(listed, pool.map(
                lambda rel: _differs(os.path.join(folder, rel), listed[rel]), listed)) if p]
        if problems:
            more = f" ({len(problems) - 1} more files differ)" if len(problems) > 1 else ""
            raise CorruptCheckpoint(directory, step, problems[0][0], problems[0][1] + more)
    # The JSON files the manifest does not cover: _CHECKPOINT_METADATA, or all of an old step's.
    for rel in _json_files(files):
        if rel not in listed:
            try:
                json.loads(_read_bytes(os.path.join(folder, rel)))
            except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
                raise CorruptCheckpoint(directory, step, rel, f"is not valid JSON ({e})") from e
    unlisted = [rel for rel in files if rel not in listed and rel not in WRITTEN_AT_COMMIT]
    if listed and unlisted:
        log.warning("checkpoint step %d in %s: ignoring files that %s does not list: %s", step,
                    directory, MANIFEST, unlisted)
    if not listed:
        log.warning("checkpoint step %d in %s has no %s (an earlier jaxlm wrote it): restoring "
                    "it unverified", step, directory, MANIFEST)
    return bool(listed)


_THREADS = 8  # files hashed at once


def _read_manifest(folder: str, directory: str, step: int) -> dict:
    """{path: {"size", "sha256"}} of the step's manifest; {} for a step written without one."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        if MANIFEST in _manifest_recorded(folder):
            raise CorruptCheckpoint(directory, step, MANIFEST, "is missing (_CHECKPOINT_METADATA "
                                    "says that it was written)")
        return {}
    try:
        listed = json.loads(_read_bytes(path))["files"]
        if not listed or not all(isinstance(e["size"], int) and isinstance(e["sha256"], str)
                                 for e in listed.values()):
            raise ValueError("no files, or an entry without an integer size and a sha256")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CorruptCheckpoint(directory, step, MANIFEST, f"cannot be read ({e})") from e
    return listed


def _manifest_recorded(folder: str) -> str:
    """The manifest name that `Checkpointer.save` recorded in the step's Orbax metadata ("" for
    an earlier jaxlm's step, or metadata that cannot be read: the JSON check reports it)."""
    try:
        metadata = json.loads(_read_bytes(os.path.join(folder, "_CHECKPOINT_METADATA")))
        return str((metadata.get("custom_metadata") or {}).get("checksums", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def _differs(path: str, entry: dict) -> str:
    """How the file at `path` differs from its manifest `entry` ("" when it does not)."""
    if not os.path.isfile(path):
        return f"is missing ({MANIFEST} lists it)"
    size = os.path.getsize(path)
    if size != entry["size"]:
        return (f"has {size} bytes, {MANIFEST} lists {entry['size']} "
                f"({'truncated' if size < entry['size'] else 'grown'})")
    digest = _describe(path)["sha256"]
    if digest != entry["sha256"]:
        return f"has sha256 {digest[:16]}..., {MANIFEST} lists {entry['sha256'][:16]}..."
    return ""


def _describe(path: str) -> dict:
    with open(path, "rb") as f:
        return {"size": os.fstat(f.fileno()).st_size,
                "sha256": hashlib.file_digest(f, "sha256").hexdigest()}


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _files(folder: str) -> list[str]:
    """The files under `folder` as sorted '/'-separated relative paths, but the manifest's own."""
    found = []
    for root, _, names in os.walk(folder):
        for name in names:
            found.append(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"))
    return sorted(f for f in found if f not in (MANIFEST, MANIFEST + ".tmp"))


def _json_files(files: list[str]) -> list[str]:
    """Those of `files` that Orbax and Grain write as JSON (and read with json.loads, whose
    errors name no file)."""
    names = ("_CHECKPOINT_METADATA", "_METADATA", "_sharding")
    return [rel for rel in files if rel.rsplit("/", 1)[-1] in names
            or rel.endswith(".json") or "array_metadatas/" in rel]


# Errors of damaged files: their types, or what TensorStore's messages say.
_DAMAGE_TYPES = (json.JSONDecodeError, UnicodeDecodeError, FileNotFoundError, EOFError)
_DAMAGE_WORDS = ("DATA_LOSS", "Invalid JSON", "Error decoding", "CRC-32", "checksum")


def _read_error(error: Exception, directory: str, step: int) -> Exception:
    """What to raise for `error`, raised by Orbax reading `step`: `CorruptCheckpoint` (so the
    fall-back applies) when it is one of damaged files (a step without a manifest, or bytes
    damaged before the manifest hashed them); else a plain error that moves nothing."""
    chain, e = [], error
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    damaged = any(isinstance(e, _DAMAGE_TYPES) or any(w in str(e) for w in _DAMAGE_WORDS)
                  for e in chain)
    if damaged:
        return CorruptCheckpoint(directory, step, _file_named(chain, directory, step),
                                 f"cannot be read ({type(error).__name__}: {error})")
    return RuntimeError(
        f"cannot restore checkpoint step {step} from {directory}: {error}. The checkpoint was "
        "left untouched; restore another step, or move it away to start from the previous one.")


def _file_named(chain: list, directory: str, step: int) -> str:
    """The step's file that the errors name (TensorStore's 'local file "..."'), else the step."""
    folder = os.path.join(directory, str(step))
    for e in chain:
        for path in re.findall(r'file "([^"]+)"', str(e)):
            if os.path.isfile(path) and os.path.abspath(path).startswith(folder + os.sep):
                return os.path.relpath(path, folder).replace(os.sep, "/")
    return "(a file of the step)"


def _none_restores(directory: str, corrupt: list) -> RuntimeError:
    problems = "\n  ".join(str(e) for e in corrupt)
    return RuntimeError(
        f"no checkpoint in {directory} restores, each step is corrupt:\n  {problems}\nNothing was "
        f"moved or deleted; move them away (e.g. to {CORRUPT}/ beside it) to start without them.")


def move_aside(folder: str, where: str) -> str:
    """Renames the step folder `folder` into `where` (a suffix if the name is taken); returns
    its new path."""
    os.makedirs(where, exist_ok=True)
    name = os.path.basename(folder)
    target, n = os.path.join(where, name), 1
    while os.path.exists(target):
        target, n = os.path.join(where, f"{name}.{n}"), n + 1
    os.rename(folder, target)
    return target


def _quantized_into_float(saved_dtype, wanted_dtype) -> bool:
    return not np.issubdtype(np.dtype(saved_dtype), np.floating) and np.issubdtype(np.dtype(wanted_dtype), np.floating)


def _saved_shapes(manager, step: int) -> dict:
    return _shapes_in(manager.item_metadata(step))


def _shapes_in(item_metadata) -> dict:
    return {m.name: tuple(m.shape) for m in jax.tree.leaves(item_metadata[STATE])}


def _shapes(tree) -> dict:
    return {_dotted(path): tuple(x.shape) for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def _differing(saved: dict, wanted: dict) -> list[tuple[str, tuple]]:
    """(name, wanted shape) of the arrays whose saved shape is not the wanted one."""
    return [(name, shape) for name, shape in wanted.items() if saved.get(name) != shape]


def _dotted(path) -> str:
    """`opt_state.1.0.mu.decoder.kernel`: the names Orbax gives saved arrays."""
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
