"""Many hosts on one machine: 2 processes x 4 CPU devices (tools/launch_local.py) against 1 x 8.

Every subprocess has a hard timeout, and the launcher kills its processes when it dies, so a
hung collective fails the test instead of hanging the suite.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import evaluate
from jaxlm.data import builders
from jaxlm.parallel import distributed
from jaxlm.train import checkpoint, loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "tools", "launch_local.py")
sys.path.insert(0, os.path.dirname(LAUNCH))
import launch_local  # noqa: E402  (a script, not a package module)

needs_shakespeare = pytest.mark.skipif(
    not (builders.jaxlm_data_dir() / "tinyshakespeare" / "input.txt").exists(),
    reason="Tiny Shakespeare not found under JAXLM_DATA_DIR")

# A 2-layer char GPT; the learning rate schedule does not depend on train.steps (decay_steps),
# so a 10-step run and the first 10 steps of a 15-step run are the same.
OVERRIDES = {
    "data.seq_len": 32, "model.num_layers": 2, "model.num_heads": 4, "model.emb_dim": 32,
    "model.max_len": 32, "model.vocab_multiple": 8, "train.steps": 10, "train.batch_size": 8,
    "train.log_every": 1, "train.eval_every": 10, "train.eval_batches": 2,
    "train.steps_per_call": 5, "train.peak_flops": 1e9, "optim.lr": 3e-3, "optim.warmup_steps": 2,
    "optim.decay_steps": 20, "checkpoint.every": 5, "sample.max_new_tokens": 0,
    "mesh.data": 4, "mesh.tensor": 2,
}
RUN_TIMEOUT = 240  # seconds, for one 2-process run (about 25 s on 2 idle cores)


def launch(*command, processes=2, timeout=RUN_TIMEOUT, **options):
    args = [f"--processes={processes}", f"--timeout={timeout}",
            *(f"--{k}={v}" for k, v in options.items()), "--", *command]
    # The launcher's own --timeout stops the run; this one only guards against the launcher.
    return subprocess.run([sys.executable, LAUNCH, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout + 60)


def read_metrics(workdir, key="train/loss"):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    return [(m["step"], m[key]) for m in lines if key in m]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Tiny Shakespeare prepared once here, so the launched processes only read it."""
    path = str(tmp_path_factory.mktemp("tfds"))
    builders.get_source(builders.TINY_SHAKESPEARE, "train", data_dir=path)
    return path


@pytest.fixture(scope="module")
def two_process_run(data_dir, tmp_path_factory):
    """The workdir of a 10-step run of 2 processes x 4 devices (checkpoints at steps 5 and 10)."""
    workdir = tmp_path_factory.mktemp("two_processes")
    flags = [f"--config.{k}={v}" for k, v in {**OVERRIDES, "data.data_dir": data_dir}.items()]
    result = launch(sys.executable, "-m", "jaxlm.main", "--config=configs/gpt_shakespeare_char.py",
                    f"--workdir={workdir}", *flags, devices_per_process=4)
    assert result.returncode == 0, result.stderr[-5000:]
    return workdir


@pytest.fixture(scope="module")
def one_process_run(two_process_run, tmp_path_factory):
    """(workdir, final state) of the same config run 15 steps by this process on 8 devices."""
    config = config_lib.load(str(two_process_run))
    assert jax.process_count() == 1 and jax.device_count() == 8
    config.train.steps = 15
    workdir = tmp_path_factory.mktemp("one_process")
    return workdir, loop.train_and_evaluate(config, str(workdir))


@needs_shakespeare
def test_two_processes_log_the_losses_of_one_process_on_the_same_mesh(two_process_run, one_process_run):
    two = read_metrics(two_process_run)
    one = dict(read_metrics(one_process_run[0]))
    assert [step for step, _ in two] == list(range(1, 11))  # process 0 alone writes metrics
    np.testing.assert_allclose([loss for _, loss in two], [one[s] for s in range(1, 11)], rtol=1e-5)
    assert [step for step, _ in read_metrics(two_process_run, "eval/loss")] == [10]
    assert len(os.listdir(two_process_run / "tensorboard")) == 1


@needs_shakespeare
def test_the_two_process_checkpoint_restores_in_one_process(two_process_run, one_process_run):
    files = sorted(os.listdir(two_process_run / "checkpoints" / "10" / checkpoint.DATA))
    assert "process_0-of-2.json" in files and "process_1-of-2.json" in files
    run, params, step = loop.restore_latest(str(two_process_run))
    assert step == 10 and run.partitioner.mesh.size == 8
    restored = checkpoint.Checkpointer(str(one_process_run[0]), read_only=True)
    try:  # the 1-process run's own step-10 parameters
        reference = restored.restore(run.abstract_state, step=10).params
    finally:
        restored.close()
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    logged = dict(read_metrics(two_process_run, "eval/loss"))[10]
    assert evaluate.evaluate(str(two_process_run), eval_batches=2)["eval/loss"] == pytest.approx(logged, rel=1e-5)


@needs_shakespeare
def test_one_process_resumes_the_two_process_run_where_it_stopped(two_process_run, one_process_run, tmp_path):
    """The data iterator positions of both processes agree, so one process continues them."""
    workdir = tmp_path / "resumed"
    shutil.copytree(two_process_run, workdir)
    config = config_lib.load(str(workdir))
    config.train.steps = 15
    loop.train_and_evaluate(config, str(workdir))
    resumed = dict(read_metrics(workdir))
    one = dict(read_metrics(one_process_run[0]))
    assert sorted(resumed) == list(range(1, 16))
    np.testing.assert_allclose([resumed[s] for s in range(11, 16)], [one[s] for s in range(11, 16)], rtol=1e-5)


def test_iterator_positions_that_disagree_are_an_error_naming_the_process_counts(tmp_path):
    for i, position in enumerate((10, 10)):
        (tmp_path / f"process_{i}-of-2.json").write_text(json.dumps({"next_index": position}))
    assert checkpoint.common_iterator_state(tmp_path) == {"next_index": 10}
    (tmp_path / "process_1-of-2.json").write_text(json.dumps({"next_index": 9}))
    with pytest.raises(ValueError, match=r"saved by 2 processes at different positions(.|\n)*resume with 2 processes"):
        checkpoint.common_iterator_state(tmp_path)


def test_launch_local_returns_the_failing_status_and_stops_the_others(tmp_path):
    """Process 0 ignores SIGTERM and would sleep for a minute; process 1 waits until process 0
    is up, then exits 3."""
    pid_file = tmp_path / "pid"
    script = ("import os, signal, sys, time\n"
              "i = os.environ['JAXLM_PROCESS_ID']\n"
              "print('hello from', i, os.environ['JAXLM_NUM_PROCESSES'], os.environ['JAXLM_COORDINATOR'])\n"
              "if i == '0':\n"
              "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
              f"    open({str(pid_file)!r} + '.tmp', 'w').write(str(os.getpid()))\n"
              f"    os.rename({str(pid_file)!r} + '.tmp', {str(pid_file)!r})\n"
              "    time.sleep(60)\n"
              f"while not os.path.exists({str(pid_file)!r}):\n"
              "    time.sleep(0.05)\n"
              "sys.exit(3)\n")
    (tmp_path / "child.py").write_text(script)
    result = launch(sys.executable, str(tmp_path / "child.py"), timeout=30, grace=1)
    assert result.returncode == 3, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("[p0] hello from 0 2 127.0.0.1:") for line in lines), lines
    assert any(line.startswith("[p1] hello from 1 2 127.0.0.1:") for line in lines), lines
    assert "process 1 exited with status 3" in result.stderr
    with pytest.raises(ProcessLookupError):  # SIGKILLed after the grace period
        os.kill(int(pid_file.read_text()), 0)


def test_launch_local_stops_everything_at_the_timeout():
    result = launch(sys.executable, "-c", "import time; time.sleep(60)", timeout=2, grace=1)
    assert result.returncode == launch_local.TIMEOUT_STATUS
    assert "--timeout=2s passed" in result.stderr


def test_launch_local_gives_each_process_its_own_device_count():
    base = {"XLA_FLAGS": "--xla_cpu_foo=1 --xla_force_host_platform_device_count=8", "PATH": "/bin"}
    env = launch_local.process_env(base, 1, 2, 1234, 4)
    assert env["XLA_FLAGS"] == "--xla_cpu_foo=1 --xla_force_host_platform_device_count=4"
    assert (env["JAX_NUM_CPU_DEVICES"], env["JAX_PLATFORMS"]) == ("4", "cpu")
    assert (env["JAXLM_COORDINATOR"], env["JAXLM_NUM_PROCESSES"], env["JAXLM_PROCESS_ID"]) == (
        "127.0.0.1:1234", "2", "1")
    assert launch_local.process_env({"JAX_PLATFORMS": "cuda"}, 0, 2, 1, 1)["JAX_PLATFORMS"] == "cuda"


def no_cluster():
    return 0


def settings(**values):
    return {**distributed.UNSET, **values}


def test_distributed_settings_come_from_the_config_then_the_environment():
    env = {"JAXLM_COORDINATOR": "10.0.0.1:9", "JAXLM_NUM_PROCESSES": "4", "JAXLM_PROCESS_ID": "3"}
    assert distributed.resolve(settings(), env, no_cluster) == dict(
        coordinator_address="10.0.0.1:9", num_processes=4, process_id=3, cluster_detection_method="deactivate")
    from_config = distributed.resolve(settings(coordinator="h:1", process_id=0), env, no_cluster)
    assert (from_config["coordinator_address"], from_config["num_processes"], from_config["process_id"]) == ("h:1", 4, 0)
    assert distributed.resolve(None, env, no_cluster)["process_id"] == 3


def test_no_distributed_settings_mean_one_process_unless_jax_detects_a_cluster():
    assert distributed.resolve(settings(), {}, no_cluster) is None
    assert distributed.resolve(settings(), {}, lambda: 1) is None  # e.g. a SLURM job of one task
    assert distributed.resolve(settings(), {"JAXLM_COORDINATOR": ""}, lambda: 4) == {}  # JAX fills all


def test_partial_or_bad_distributed_settings_are_errors_that_name_the_key():
    with pytest.raises(ValueError, match=r"coordinator='h:1' \(from config.distributed.coordinator\).*"
                                         r"missing num_processes: set config.distributed.num_processes or "
                                         r"JAXLM_NUM_PROCESSES; process_id"):
        distributed.resolve(settings(coordinator="h:1"), {}, no_cluster)
    with pytest.raises(ValueError, match=r"missing coordinator.*JAXLM_COORDINATOR"):
        distributed.resolve(settings(), {"JAXLM_NUM_PROCESSES": "2", "JAXLM_PROCESS_ID": "0"}, no_cluster)
    with pytest.raises(ValueError, match=r"JAXLM_NUM_PROCESSES='two' is not an integer"):
        distributed.resolve(settings(), {"JAXLM_NUM_PROCESSES": "two"}, no_cluster)
    with pytest.raises(ValueError, match=r"process_id=2 \(from JAXLM_PROCESS_ID\) is not in \[0, num_processes=2\)"):
        distributed.resolve(settings(coordinator="h:1", num_processes=2), {"JAXLM_PROCESS_ID": "2"}, no_cluster)


def test_main_stops_on_partial_distributed_settings_naming_the_missing_key(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in distributed.ENV_VARS.values()}
    result = subprocess.run(
        [sys.executable, "-m", "jaxlm.main", "--config=configs/gpt_shakespeare_char.py",
         f"--workdir={tmp_path}", "--config.distributed.coordinator=127.0.0.1:1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "missing num_processes: set config.distributed.num_processes or JAXLM_NUM_PROCESSES" in result.stderr
    assert not os.listdir(tmp_path)  # stopped before anything was written
