"""Checkpoint checksums: every damaged file is caught, named with its step, and a corrupt latest
step falls back to the previous one (moved aside, never deleted). Small states, seconds."""

import json
import logging
import os
import re
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from jaxlm.train import checkpoint
from jaxlm.train import state as state_lib


def make_state(seed: int) -> state_lib.TrainState:
    # 64x64 floats: stored out of line in an OCDBT data file (values up to 1 KiB are inlined).
    params = {"w": jax.random.normal(jax.random.key(seed), (64, 64)), "b": jnp.full((16,), seed, jnp.float32)}
    opt_state = jax.tree.map(lambda x: x + seed, optax.adam(1e-3).init(params))
    return state_lib.TrainState(step=jnp.asarray(seed, jnp.int32), params=params, opt_state=opt_state)


def abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def data_iter(position: int = 0):
    it = iter(grain.MapDataset.range(100).to_iter_dataset())
    for _ in range(position):
        next(it)
    return it


SAVED = {1: (make_state(1), 3), 2: (make_state(2), 5)}  # step: (state, iterator position)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A workdir with steps 1 and 2, saved asynchronously."""
    workdir = tmp_path_factory.mktemp("pristine")
    ckpt = checkpoint.Checkpointer(str(workdir), async_save=True)
    for step, (state, position) in SAVED.items():
        ckpt.save(step, state, data_iter(position))
    ckpt.close()
    return workdir


@pytest.fixture
def workdir(pristine, tmp_path):
    shutil.copytree(pristine, tmp_path / "run")
    return tmp_path / "run"


def assert_restores(restored, step):
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(SAVED[step][0]), strict=True):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))


def restore(workdir, step=None, **kwargs):
    """(state, iterator position, latest step after it) of a restore from `workdir`."""
    ckpt = checkpoint.Checkpointer(str(workdir), **kwargs)
    it = data_iter()
    try:
        return ckpt.restore(abstract(SAVED[1][0]), it, step=step), it.get_state()["next_index"], ckpt.latest_step()
    finally:
        ckpt.close()


def step_files(workdir, step=2) -> list[str]:
    folder = workdir / "checkpoints" / str(step)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# Each kind of file in a step folder: how to find it.
KINDS = {
    "array data": lambda files: max((f for f in files if f.startswith("state/ocdbt.process_0/d/")),
                                    key=lambda f: FILE_SIZES[f]),
    "b-tree node": lambda files: next(f for f in files if f.startswith("state/d/")),
    "manifest.ocdbt": lambda files: "state/manifest.ocdbt",
    "process manifest.ocdbt": lambda files: "state/ocdbt.process_0/manifest.ocdbt",
    "_METADATA": lambda files: "state/_METADATA",
    "_sharding": lambda files: "state/_sharding",
    "_CHECKPOINT_METADATA": lambda files: "_CHECKPOINT_METADATA",
    "data iterator": lambda files: "data_iter/process_0-of-1.json",
}
FILE_SIZES = {}


def damage(workdir, kind: str, truncate: bool = False) -> str:
    """Overwrites 64 bytes in the middle of step 2's file of `kind` (or drops its second half);
    returns its path in the step folder."""
    folder = workdir / "checkpoints" / "2"
    files = step_files(workdir)
    FILE_SIZES.update({f: (folder / f).stat().st_size for f in files})
    rel = KINDS[kind](files)
    path, size = folder / rel, FILE_SIZES[rel]
    with open(path, "r+b") as f:
        if truncate:
            f.truncate(size // 2)
        else:
            n = min(64, size)
            f.seek((size - n) // 2)
            f.write(bytes(range(n)))  # NUL and other control bytes: no valid JSON either
    return rel


@pytest.mark.parametrize("kind", list(KINDS))
def test_damaged_file_is_named_and_latest_falls_back_to_the_previous_step(workdir, kind, caplog):
    rel = damage(workdir, kind)
    with pytest.raises(checkpoint.CorruptCheckpoint, match=rf"step 2 in \S+ is corrupt: {re.escape(rel)} "):
        restore(workdir, step=2)
    assert os.path.isdir(workdir / "checkpoints" / "2")  # an explicit step never moves

    with caplog.at_level(logging.WARNING, logger="jaxlm"):
        state, position, latest = restore(workdir)
    assert_restores(state, 1)
    assert position == SAVED[1][1] and latest == 1
    moved = workdir / "checkpoints.corrupt" / "2"
    assert (moved / rel).read_bytes() != b"" and not (workdir / "checkpoints" / "2").exists()
    assert any(f"moved corrupt checkpoint step 2 to {moved}" in r.getMessage() and rel in r.getMessage()
               for r in caplog.records)


def assert_fell_back_to_step_1(workdir, rel):
    """The latest restore gave step 1's state and position; step 2 (holding `rel`) moved aside."""
    state, position, latest = restore(workdir)
    assert_restores(state, 1)
    assert position == SAVED[1][1] and latest == 1
    assert (workdir / "checkpoints.corrupt" / "2" / rel).exists()


def test_truncated_data_file_is_named_and_latest_falls_back(workdir):
    rel = damage(workdir, "array data", truncate=True)
    with pytest.raises(checkpoint.CorruptCheckpoint, match=rf"{re.escape(rel)} has \d+ bytes, checksums.json lists \d+ \(truncated\)"):
        restore(workdir, step=2)
    assert_fell_back_to_step_1(workdir, rel)


def test_untouched_checkpoint_restores_bit_identically_and_lists_every_file(workdir):
    for step in (1, 2):
        manifest = json.loads((workdir / "checkpoints" / str(step) / "checksums.json").read_text())
        assert sorted(manifest["files"]) == [f for f in step_files(workdir, step) if f not in (
            "checksums.json", "_CHECKPOINT_METADATA", "commit_success.txt")]
        state, position, latest = restore(workdir, step=step)
        assert_restores(state, step)
        assert position == SAVED[step][1]
    state, position, latest = restore(workdir)
    assert_restores(state, 2)
    assert latest == 2 and not (workdir / "checkpoints.corrupt").exists()


def test_synchronous_save_writes_the_manifest_and_orbax_keeps_and_deletes_steps(tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2, async_save=False)
    for step in (1, 2, 3):
        ckpt.save(step, SAVED[1][0], data_iter(step))
        assert (tmp_path / "checkpoints" / str(step) / "checksums.json").exists()  # before close
    assert ckpt.manager.all_steps() == [2, 3] and ckpt.verify(3)
    assert set(ckpt.manager.item_metadata(3)) >= {checkpoint.STATE, checkpoint.DATA}
    ckpt.close()
    assert checkpoint.Checkpointer(str(tmp_path), read_only=True).latest_step() == 3


def drop_manifest(workdir, step=2):
    """Makes `step` look written by an earlier jaxlm: no manifest, none recorded."""
    folder = workdir / "checkpoints" / str(step)
    (folder / "checksums.json").unlink()
    metadata = json.loads((folder / "_CHECKPOINT_METADATA").read_text())
    metadata["custom_metadata"] = {}
    (folder / "_CHECKPOINT_METADATA").write_text(json.dumps(metadata))


def test_a_step_written_without_a_manifest_restores_with_a_warning(workdir, caplog):
    drop_manifest(workdir)
    with caplog.at_level(logging.WARNING, logger="jaxlm"):
        state, position, latest = restore(workdir)
    assert_restores(state, 2)
    assert position == SAVED[2][1] and latest == 2
    assert any("step 2" in r.getMessage() and "no checksums.json" in r.getMessage() for r in caplog.records)


# TensorStore's failed read leaves a callback on Orbax's closed event loop ("Event loop is closed").
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_damaged_step_without_a_manifest_is_named_from_orbax_error_and_falls_back(workdir):
    drop_manifest(workdir)
    rel = damage(workdir, "b-tree node")  # OCDBT's own CRC-32C catches this one
    with pytest.raises(checkpoint.CorruptCheckpoint, match=rf"step 2 in \S+ is corrupt: {re.escape(rel)} cannot be read"):
        restore(workdir, step=2)
    assert_fell_back_to_step_1(workdir, rel)


@pytest.mark.parametrize("damaged", [True, False])
def test_orbax_errors_of_damaged_files_fall_back_and_others_move_nothing(workdir, monkeypatch, damaged):
    path = workdir / "checkpoints" / "2" / "state" / "manifest.ocdbt"
    error = (ValueError(f'DATA_LOSS: Error reading local file "{path}": simulated') if damaged
             else RuntimeError("RESOURCE_EXHAUSTED: simulated"))
    orbax_restore = ocp.CheckpointManager.restore

    def restore_failing_step_2(self, step, *args, **kwargs):
        if step == 2:
            raise error
        return orbax_restore(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", restore_failing_step_2)
    if damaged:
        with pytest.raises(checkpoint.CorruptCheckpoint, match=r"step 2 in \S+ is corrupt: state/manifest.ocdbt cannot be read"):
            restore(workdir, step=2)
        state, _, latest = restore(workdir)
        assert_restores(state, 1)
        assert latest == 1 and (workdir / "checkpoints.corrupt" / "2").is_dir()
    else:
        with pytest.raises(RuntimeError, match=r"cannot restore checkpoint step 2 .*RESOURCE_EXHAUSTED"):
            restore(workdir)
        assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2"]
        assert not (workdir / "checkpoints.corrupt").exists()


def test_a_lost_manifest_is_corruption(workdir):
    (workdir / "checkpoints" / "2" / "checksums.json").unlink()
    with pytest.raises(checkpoint.CorruptCheckpoint, match=r"step 2 in \S+ is corrupt: checksums.json is missing"):
        restore(workdir, step=2)
    (workdir / "checkpoints" / "1" / "checksums.json").write_text("{garbage")
    with pytest.raises(checkpoint.CorruptCheckpoint, match=r"step 1 in \S+ is corrupt: checksums.json cannot be read"):
        restore(workdir, step=1)


def test_when_no_step_restores_nothing_moves_and_the_error_names_each(workdir):
    damage(workdir, "array data")
    (workdir / "checkpoints" / "1" / "state" / "_METADATA").write_text("{not json")
    with pytest.raises(RuntimeError, match=r"(?s)no checkpoint in .* restores.*step 2 .*step 1 .*state/_METADATA"):
        restore(workdir)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2"]
    assert not (workdir / "checkpoints.corrupt").exists()


def test_read_only_and_restore_params_fall_back_without_moving_anything(workdir, caplog):
    damage(workdir, "array data")
    before = sorted(p.name for p in workdir.iterdir()), step_files(workdir)
    state, position, latest = restore(workdir, read_only=True)
    assert_restores(state, 1)
    assert position == SAVED[1][1] and latest == 2  # step 2 stays where it is
    with caplog.at_level(logging.WARNING, logger="jaxlm"):
        params, step = checkpoint.restore_params(str(workdir), abstract(SAVED[1][0]).params)
    assert step == 1
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(SAVED[1][0].params), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert (sorted(p.name for p in workdir.iterdir()), step_files(workdir)) == before
    assert any("step 2" in r.getMessage() and "corrupt" in r.getMessage() for r in caplog.records)
    damage_step_1 = workdir / "checkpoints" / "1" / "state" / "_sharding"
    damage_step_1.write_text("{not json")
    with pytest.raises(RuntimeError, match=r"(?s)step 2 .*step 1 .*state/_sharding"):
        checkpoint.restore_params(str(workdir), abstract(SAVED[1][0]).params)


def test_shapes_that_differ_are_a_config_error_that_moves_nothing(workdir):
    wrong = abstract(SAVED[1][0])
    wrong = wrong.replace(params={**wrong.params, "b": jax.ShapeDtypeStruct((8,), jnp.float32)})
    ckpt = checkpoint.Checkpointer(str(workdir))
    with pytest.raises(ValueError, match="does not fit this config"):
        ckpt.restore(wrong, step=None)
    ckpt.close()
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2"]
    assert not (workdir / "checkpoints.corrupt").exists()


def test_after_a_fall_back_the_run_saves_on_from_the_restored_step(workdir):
    damage(workdir, "array data")
    ckpt = checkpoint.Checkpointer(str(workdir), keep=2, async_save=True)
    ckpt.restore(abstract(SAVED[1][0]))
    assert ckpt.latest_step() == 1
    ckpt.save(2, SAVED[2][0], data_iter(7))
    ckpt.close()
    state, position, latest = restore(workdir)
    assert_restores(state, 2)
    assert position == 7 and latest == 2
    assert os.listdir(workdir / "checkpoints.corrupt") == ["2"]
