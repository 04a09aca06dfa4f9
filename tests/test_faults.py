"""Fault injection: what a user needs after each fault is the same losses as an uninterrupted run,
or a clear error naming the problem and a workdir that is unchanged.

Runs are subprocesses of `python -m jaxlm.main` on a tiny char GPT, killed (kill -9, SIGTERM,
SIGINT) at points chosen from a fixed seed, then resumed. The slow tests try many kill points;
the fast ones try one of each kind.
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm.train import checkpoint, loop, metrics as metrics_lib, workdir as workdir_lib
from test_train import REPO, needs_shakespeare, read_metrics, tiny_config, train

STEPS, EVERY = 60, 10
TINY = [f"--config.train.steps={STEPS}", f"--config.checkpoint.every={EVERY}", "--config.checkpoint.keep=2",
        "--config.train.log_every=1", "--config.train.steps_per_call=1", "--config.train.eval_every=30",
        "--config.train.eval_batches=1", "--config.train.batch_size=8", "--config.train.peak_flops=1e9",
        "--config.data.seq_len=32", "--config.model.max_len=32", "--config.model.num_layers=2",
        "--config.model.emb_dim=32", "--config.sample.max_new_tokens=0", "--config.mesh.num_devices=1"]


def start(workdir, data_dir, *extra):
    args = ["--config=configs/gpt_shakespeare_char.py", f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}", *TINY, *extra]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.Popen([sys.executable, "-m", "jaxlm.main", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def wait_for_step(proc, workdir, step: int, timeout=300):
    """Returns once metrics.jsonl has a line of `step` or later (the run logs every step)."""
    deadline = time.time() + timeout
    metrics = os.path.join(workdir, "metrics.jsonl")
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before step {step}: {proc.communicate()[1][-2000:]}")
        if os.path.exists(metrics) and read_metrics(workdir) and max(read_metrics(workdir)) >= step:
            return
        time.sleep(0.005)
    raise AssertionError(f"no step {step} within {timeout}s")


def losses(workdir) -> dict:
    """step -> train loss, asserting that metrics.jsonl holds each step once."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f if "train/loss" in line]
    assert len(steps) == len(set(steps)), f"duplicate steps in metrics.jsonl: {sorted(steps)}"
    return read_metrics(workdir)


@pytest.fixture(scope="module")
def uninterrupted_run(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    code, err = finish(start(workdir, data_dir))
    assert code == 0, err
    return workdir


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run):
    return losses(uninterrupted_run)


def kill_and_resume(workdir, data_dir, kill_after_step: int) -> dict:
    proc = start(workdir, data_dir)
    wait_for_step(proc, workdir, kill_after_step)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    code, err = finish(start(workdir, data_dir))
    assert code == 0, err
    return losses(workdir)


@needs_shakespeare
def test_kill_9_in_training_then_resume_gives_the_uninterrupted_losses(data_dir, tmp_path, uninterrupted):
    got = kill_and_resume(tmp_path / "run", data_dir, kill_after_step=25)
    assert got == uninterrupted  # bit for bit, each step once
    assert os.path.exists(tmp_path / "run" / "metrics.replayed.jsonl")  # the replayed steps' first lines


@needs_shakespeare
@pytest.mark.slow
def test_kill_9_at_seeded_random_points_always_resumes_to_the_uninterrupted_losses(data_dir, tmp_path,
                                                                                   uninterrupted):
    """Kill points in training, at saves (async: the write runs beside the next steps) and right
    after them (old checkpoints being deleted, keep=2); two kills in one run."""
    points = sorted(random.Random(15).sample(range(2, STEPS), 6)) + [EVERY, 2 * EVERY + 1, 4 * EVERY]
    for i, point in enumerate(points):
        got = kill_and_resume(tmp_path / f"run{i}", data_dir, point)
        assert got == uninterrupted, f"kill after step {point}"
    workdir = tmp_path / "twice"
    proc = start(workdir, data_dir)
    wait_for_step(proc, workdir, 15)
    proc.kill()
    proc.wait()
    assert kill_and_resume(workdir, data_dir, 45) == uninterrupted


@needs_shakespeare
@pytest.mark.parametrize("signum", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)])
def test_a_signal_logs_the_pending_steps_saves_and_the_resumed_run_matches(data_dir, tmp_path,
                                                                         uninterrupted_run, signum):
    workdir = tmp_path / "run"
    proc = start(workdir, data_dir, "--config.train.log_every=7")  # steps wait to be logged
    wait_for_step(proc, workdir, 14)
    proc.send_signal(signum)
    code, err = finish(proc)
    assert code == 0, err
    saved = checkpoint.Checkpointer(str(workdir), read_only=True).latest_step()
    assert saved is not None and max(read_metrics(workdir)) == saved  # no step lost to the log
    code, err = finish(start(workdir, data_dir, "--config.train.log_every=7"))
    assert code == 0, err
    final_eval = read_metrics(workdir, "eval/loss")[STEPS]  # the final parameters on fixed batches
    assert final_eval == read_metrics(uninterrupted_run, "eval/loss")[STEPS]


def damage(path, how: str) -> None:
    data = bytearray(open(path, "rb").read())
    if how == "flip":
        middle = len(data) // 2
        data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    else:
        data = data[:len(data) // 2]
    with open(path, "wb") as f:
        f.write(data)


@needs_shakespeare
@pytest.mark.slow  # tests/test_checkpoint_integrity.py covers the fall-back in the fast suite
@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_a_corrupt_latest_checkpoint_is_moved_aside_and_the_rerun_matches(data_dir, tmp_path, uninterrupted,
                                                                         how):
    """64 bytes flipped (or the file cut in half) in the largest data file of the last step: the
    rerun resumes from the step before, moves the bad one aside, and ends with the same losses."""
    workdir = tmp_path / "run"
    code, err = finish(start(workdir, data_dir))
    assert code == 0, err
    files = [p for p in (workdir / "checkpoints" / str(STEPS) / "state").rglob("*") if p.is_file()]
    damage(max(files, key=lambda p: p.stat().st_size), how)
    code, err = finish(start(workdir, data_dir))
    assert code == 0, err
    assert f"moved corrupt checkpoint step {STEPS} to" in err and f"restored step {STEPS - EVERY}" in err
    assert (workdir / "checkpoints.corrupt" / str(STEPS) / "state").is_dir()  # kept, not deleted
    assert losses(workdir) == uninterrupted


def test_a_first_ctrl_c_asks_to_stop_and_a_second_ends_the_process_at_once():
    previous = signal.getsignal(signal.SIGINT)
    stop = loop.StopSignals()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.raised == "SIGINT"  # the loop saves and returns
        assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL  # the next one kills
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) == previous


@needs_shakespeare
@pytest.mark.slow
def test_two_runs_on_one_workdir_the_second_fails_naming_the_first(data_dir, tmp_path):
    workdir = tmp_path / "run"
    first = start(workdir, data_dir, "--config.train.steps=100000")  # still running when the second starts
    wait_for_step(first, workdir, 1)
    code, err = finish(start(workdir, data_dir, "--config.optim.lr=3e-3", "--config.seed=1"))
    assert code != 0 and f"in use by pid {first.pid}" in err
    assert first.poll() is None, "the first run must still be running"
    first.send_signal(signal.SIGTERM)
    code, err = finish(first)
    assert code == 0, err
    saved = checkpoint.Checkpointer(str(workdir), read_only=True).latest_step()
    assert sorted(losses(workdir)) == list(range(1, saved + 1))  # one run's steps, each once
    assert config_lib.load(str(workdir)).seed == 0


def test_the_workdir_lock_names_its_holder_and_a_stale_one_is_taken_over(tmp_path, caplog):
    with workdir_lib.lock(str(tmp_path)):
        with pytest.raises(workdir_lib.WorkdirLocked, match=rf"in use by pid {os.getpid()} on "):
            with workdir_lib.lock(str(tmp_path)):
                pass
    assert not os.path.exists(tmp_path / workdir_lib.LOCK_FILE)  # released
    with open(tmp_path / workdir_lib.LOCK_FILE, "w") as f:  # what kill -9 leaves behind
        json.dump({"pid": 4242, "host": "elsewhere", "since": "then", "command": "train"}, f)
    with workdir_lib.lock(str(tmp_path)):
        pass
    assert "took over the lock of pid 4242 on elsewhere" in caplog.text


@needs_shakespeare
def test_a_locked_workdir_is_an_error_and_stays_unchanged(data_dir, tmp_path):
    train(tiny_config(data_dir, steps=5), tmp_path)
    before = snapshot(tmp_path)
    with workdir_lib.lock(str(tmp_path)):
        with pytest.raises(workdir_lib.WorkdirLocked):
            train(tiny_config(data_dir, steps=10), tmp_path)
    assert snapshot(tmp_path) == before


def snapshot(workdir) -> dict:
    return {str(p.relative_to(workdir)): p.read_bytes() for p in workdir.rglob("*")
            if p.is_file() and "tensorboard" not in p.parts}


@pytest.mark.parametrize("key, value, message", [
    ("train.steps", -5, "train.steps=-5 must be 0 (initialize only, nothing saved) or more"),
    ("checkpoint.every", 0, "checkpoint.every=0 must be at least 1"),
    ("train.eval_every", 0, "train.eval_every=0 must be at least 1"),
    ("optim.lr", float("inf"), "optim.lr=inf must be -1 (auto: the usual rate of peft.method) or finite"),
    ("train.nan_policy", "ignore", "train.nan_policy='ignore' must be 'stop' or 'skip'"),
])
def test_a_bad_config_value_fails_before_anything_is_written(data_dir, tmp_path, key, value, message):
    config = tiny_config(data_dir)
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(ValueError, match=re.escape(message)):
        train(config, tmp_path / "new")
    assert not os.path.exists(tmp_path / "new")


def write_text(path, text):
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def test_an_eval_split_the_vocabulary_cannot_encode_fails_before_training_and_leaves_no_workdir(tmp_path):
    # One file: the first 90% of its characters are `train` (the char vocabulary), the rest
    # `validation`, which holds a character the train text lacks.
    text = write_text(tmp_path / "corpus.txt", "to be or not to be, " * 200 + "Z" * 200)
    config = tiny_config(str(tmp_path / "tfds"))
    config.data.update(dict(name="jaxlm_text_files", files=text))
    with pytest.raises(ValueError, match=r"eval split 'validation'.*'Z'"):
        train(config, tmp_path / "new")
    assert not os.path.exists(tmp_path / "new")  # no tokenizer/ left behind
    os.makedirs(tmp_path / "made")
    with pytest.raises(ValueError, match=r"eval split 'validation'.*'Z'"):
        train(config, tmp_path / "made")
    assert os.listdir(tmp_path / "made") == []  # the user's folder stays, as it was


@needs_shakespeare
def test_non_finite_parameters_are_never_saved_under_either_policy(data_dir, tmp_path):
    """lr=1e39: the loss and gradient of step 1 are finite; the parameters it makes are not."""
    config = tiny_config(data_dir, steps=3, steps_per_call=1)
    config.optim.update(dict(lr=1e39, warmup_steps=0, clip_norm=0.0))
    config.checkpoint.every = 1
    with pytest.raises(loop.NonFiniteLoss, match="parameters or optimizer state went non-finite by step 1 "):
        train(config, tmp_path / "stop")
    assert checkpoint.Checkpointer(str(tmp_path / "stop"), read_only=True).latest_step() is None
    config.train.nan_policy = "skip"
    with pytest.raises(loop.NonFiniteLoss, match="every one of the 1 steps .* was non-finite and skipped"):
        train(config, tmp_path / "skip")
    assert checkpoint.Checkpointer(str(tmp_path / "skip"), read_only=True).latest_step() is None


@needs_shakespeare
def test_resuming_with_another_batch_size_or_model_is_an_error_and_the_configs_are_kept(data_dir, tmp_path):
    train(tiny_config(data_dir, steps=5), tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"resumes at step 5, but train.batch_size=16 \(saved 8\)"):
        train(tiny_config(data_dir, steps=10, batch_size=16), tmp_path)
    with pytest.raises(ValueError, match=r"data.seq_len=16 \(saved 32\)"):
        config = tiny_config(data_dir, steps=10)
        config.data.seq_len = 16
        train(config, tmp_path)
    for key, value, saved in (("scale_embeddings", True, False), ("positions", "sinusoidal", "learned")):
        config = tiny_config(data_dir, steps=10)  # same shapes, another function of the parameters
        config.model[key] = value
        with pytest.raises(ValueError, match=rf"resumes at step 5, but model.{key}={value!r} \(saved {saved!r}\)"):
            train(config, tmp_path)
    assert snapshot(tmp_path) == before
    config = tiny_config(data_dir, steps=10)  # more steps and dropout: changes a resume may make
    config.model.dropout = 0.1
    train(config, tmp_path)
    with open(tmp_path / "config_history.jsonl") as f:
        history = [json.loads(line) for line in f]
    assert [(h["step"], h["config"]["train"]["steps"]) for h in history] == [(0, 5), (5, 10)]
    assert config_lib.load(str(tmp_path)).train.steps == 10


def test_metrics_of_replayed_steps_are_set_aside(tmp_path):
    lines = [json.dumps({"step": s, "train/loss": float(s)}) + "\n" for s in (1, 2, 3, 4)]
    path = write_text(tmp_path / "metrics.jsonl", "".join(lines) + '{"step": 5, "trai')  # cut by a crash
    metrics_lib.set_aside_after(path, 2, str(tmp_path / "aside.jsonl"))
    with open(path) as f:
        assert f.readlines() == lines[:2]
    with open(tmp_path / "aside.jsonl") as f:
        assert f.read() == "".join(lines[2:]) + '{"step": 5, "trai'


@needs_shakespeare
def test_the_save_of_a_step_comes_before_its_evaluation(data_dir, tmp_path, monkeypatch):
    def failing_eval(self, params):
        raise RuntimeError("the eval failed")

    monkeypatch.setattr(loop.Evaluator, "__call__", failing_eval)
    config = tiny_config(data_dir, steps=10, eval_every=5)
    config.checkpoint.every = 5
    with pytest.raises(RuntimeError, match="the eval failed"):
        train(config, tmp_path)
    assert checkpoint.Checkpointer(str(tmp_path), read_only=True).latest_step() == 5


def test_all_finite_sees_inf_in_any_floating_leaf():
    from jaxlm.train import step
    tree = {"a": np.ones(3, np.float32), "count": np.int32(7), "b": np.array([1.0, np.inf])}
    assert not bool(step.all_finite(tree))
    tree["b"] = np.zeros(2)
    assert bool(step.all_finite(tree))


@needs_shakespeare
def test_an_export_into_a_folder_another_export_writes_is_an_error(data_dir, tmp_path):
    train(tiny_config(data_dir, steps=5), tmp_path / "run")
    run, params, step = loop.restore_latest(str(tmp_path / "run"))
    out = str(tmp_path / "out")

    def export():
        loop.export_workdir(run.config, str(tmp_path / "run"), out, lambda _: params, step)

    with workdir_lib.lock(out + ".partial"):
        with pytest.raises(workdir_lib.WorkdirLocked, match=f"pid {os.getpid()}"):
            export()
    assert not os.path.exists(out)
    export()
    assert sorted(os.listdir(out)) == ["checkpoints", "config.json", "tokenizer"]
