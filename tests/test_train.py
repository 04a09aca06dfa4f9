"""The trainer end to end on Tiny Shakespeare: learning, meshes, accumulation, resume, restore."""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm.data import builders
from jaxlm.train import checkpoint, compile_cache, loop, optim
from jaxlm.train import metrics as metrics_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_shakespeare = pytest.mark.skipif(
    not (builders.jaxlm_data_dir() / "tinyshakespeare" / "input.txt").exists(),
    reason="Tiny Shakespeare not found under JAXLM_DATA_DIR")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def tiny_config(data_dir, **train):
    """A 2-layer char GPT on Tiny Shakespeare that compiles and runs in seconds."""
    c = config_lib.default_config()
    c.data.update(dict(name="jaxlm_tiny_shakespeare", tokenizer="char", seq_len=32, data_dir=data_dir))
    c.model.update(dict(num_layers=2, num_heads=4, emb_dim=32, max_len=32, vocab_multiple=8))
    c.train.update(dict(steps=10, batch_size=8, log_every=1, eval_every=1000, eval_batches=2,
                        steps_per_call=5, peak_flops=1e9))
    c.train.update(train)
    c.optim.update(dict(lr=3e-3, warmup_steps=2, decay_steps=20))
    c.checkpoint.update(dict(every=1000, async_save=True))
    c.sample.max_new_tokens = 0
    c.mesh.num_devices = 1
    return c


def read_metrics(workdir, key="train/loss"):
    return metrics_lib.read_curves(str(workdir)).get(key, {})


def tensorboard_events(folder) -> list:
    """The Event protos of every event file under `folder` (TFRecord framing: length, its CRC,
    the record, its CRC)."""
    from tensorboardX.proto import event_pb2
    events = []
    for path in Path(folder).rglob("events.out.tfevents.*"):
        data = path.read_bytes()
        while data:
            length = int.from_bytes(data[:8], "little")
            event = event_pb2.Event()
            event.ParseFromString(data[12:12 + length])
            events.append(event)
            data = data[16 + length:]
    return events


def train(config, workdir):
    return loop.train_and_evaluate(config, str(workdir))


@needs_shakespeare
def test_loss_falls_and_everything_lands_in_the_workdir(data_dir, tmp_path):
    config = tiny_config(data_dir, steps=150, log_every=10, eval_every=75, steps_per_call=10)
    config.optim.update(dict(lr=1e-2, decay_steps=0))
    config.sample.max_new_tokens = 20
    train(config, tmp_path)
    losses = read_metrics(tmp_path)
    assert losses[150] < losses[10] - 0.5, losses
    evals = read_metrics(tmp_path, "eval/loss")
    assert sorted(evals) == [75, 150] and evals[150] < evals[75] < np.log(65) - 0.5
    saved = config_lib.load(str(tmp_path))
    assert saved.model.vocab_size == 72 and saved.train.steps == 150
    events = tensorboard_events(tmp_path / "tensorboard")
    tags = {v.tag for e in events for v in e.summary.value}
    assert {"train/loss", "eval/loss", "eval/accuracy"} <= tags
    hparams = [v for e in events for v in e.summary.value if v.metadata.plugin_data.plugin_name == "hparams"]
    assert hparams and b"optim.lr" in hparams[0].metadata.plugin_data.content  # the config, in the HParams tab
    assert checkpoint.Checkpointer(str(tmp_path), read_only=True).latest_step() == 150
    with open(tmp_path / "metrics.jsonl") as f:
        first = json.loads(f.readline())
    for key in ("train/perplexity", "train/grad_norm", "train/learning_rate", "train/tokens_per_sec", "train/mfu"):
        assert np.isfinite(first[key]) and first[key] > 0, key


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch installed beside jaxlm")
def test_the_trainer_leaves_an_installed_torch_unimported():
    """tensorboardX imports torch whenever it is installed: ~1.8 s of every run's start-up for
    nothing (jaxlm writes floats). The trainer's import keeps it out; TensorBoard files are
    still written (test_loss_falls_and_everything_lands_in_the_workdir)."""
    code = "import sys, jaxlm.main, tensorboardX; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


MESHES = [dict(data=8), dict(data=2, fsdp=2, tensor=2), dict(data=1, fsdp=4, tensor=2)]


@needs_shakespeare
def test_meshes_of_8_devices_give_the_single_device_losses(data_dir, tmp_path):
    train(tiny_config(data_dir), tmp_path / "single")
    reference = read_metrics(tmp_path / "single")
    assert len(reference) == 10
    for i, mesh in enumerate(MESHES):
        config = tiny_config(data_dir)
        config.mesh.update(dict(num_devices=0, **mesh))
        train(config, tmp_path / f"mesh{i}")
        losses = read_metrics(tmp_path / f"mesh{i}")
        np.testing.assert_allclose([losses[s] for s in range(1, 11)], [reference[s] for s in range(1, 11)],
                                   rtol=1e-5, err_msg=str(mesh))


@needs_shakespeare
def test_gradient_accumulation_equals_the_full_batch(data_dir, tmp_path):
    whole = train(tiny_config(data_dir, steps=5), tmp_path / "whole")
    accumulated = train(tiny_config(data_dir, steps=5, microbatches=4), tmp_path / "accumulated")
    np.testing.assert_allclose(list(read_metrics(tmp_path / "whole").values()),
                               list(read_metrics(tmp_path / "accumulated").values()), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(accumulated.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@needs_shakespeare
@pytest.mark.parametrize("first_mesh, second_mesh", [
    (dict(num_devices=1), dict(num_devices=1)),
    (dict(num_devices=1), dict(num_devices=0, fsdp=4, tensor=2)),
    (dict(num_devices=0, stage=2, data=4), dict(num_devices=0, data=8)),
])
def test_stop_and_resume_equals_an_uninterrupted_run(data_dir, tmp_path, first_mesh, second_mesh):
    """Same losses step by step (so the same data order) and the same final parameters, also when
    the second half runs on another mesh (a pipeline's checkpoint resumes without one)."""
    full = train(tiny_config(data_dir, steps=20), tmp_path / "full")
    first = tiny_config(data_dir, steps=10)
    first.mesh.update(first_mesh)
    train(first, tmp_path / "resumed")
    config = tiny_config(data_dir, steps=20)
    config.mesh.update(second_mesh)
    resumed = train(config, tmp_path / "resumed")
    expected, got = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "resumed")
    assert sorted(got) == list(range(1, 21))
    np.testing.assert_allclose([got[s] for s in range(1, 21)], [expected[s] for s in range(1, 21)], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def run_main(*args, **kwargs):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "jaxlm.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, **kwargs)


def test_a_mistyped_config_key_is_an_error_that_names_it(tmp_path):
    result = run_main("--config=configs/gpt_shakespeare_char.py", f"--workdir={tmp_path}",
                      "--config.train.stpes=5", timeout=120)
    assert result.returncode != 0
    assert "stpes" in result.stderr and 'Did you mean "steps"' in result.stderr
    with pytest.raises(AttributeError, match="stpes"):
        config_lib.default_config().train.stpes = 5
    with pytest.raises(KeyError, match="train.stpes"):
        config_lib.update(config_lib.default_config(), {"train": {"stpes": 5}})


@needs_shakespeare
def test_sigterm_saves_a_restorable_checkpoint_and_exits_0(data_dir, tmp_path):
    workdir = tmp_path / "run"
    args = ["--config=configs/gpt_shakespeare_char.py", f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}", "--config.train.steps=100000",
            "--config.train.steps_per_call=5", "--config.train.log_every=5",
            "--config.model.num_layers=1", "--config.model.emb_dim=32", "--config.checkpoint.every=100000",
            "--config.mesh.num_devices=1"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "jaxlm.main", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (metrics.exists() and metrics.stat().st_size > 0):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    step = checkpoint.Checkpointer(str(workdir), read_only=True).latest_step()
    assert step is not None and step % 5 == 0 and step < 100000
    config = config_lib.load(str(workdir))
    config.train.steps = step + 5
    state = loop.train_and_evaluate(config, str(workdir))  # resumes from the SIGTERM checkpoint
    assert int(state.step) == step + 5
    assert max(read_metrics(workdir)) == step + 5


@needs_shakespeare
def test_generate_cli_prints_the_greedy_continuation_of_the_latest_checkpoint(data_dir, tmp_path):
    state = train(tiny_config(data_dir, steps=5), tmp_path)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-m", "jaxlm.generate", f"--workdir={tmp_path}", "--prompt=ROMEO:",
         "--max_new_tokens=40", "--temperature=0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    config = config_lib.load(str(tmp_path))
    run = loop.setup(config, str(tmp_path))
    from jaxlm.infer import sampling
    prompt = np.array([run.tokenizer.encode("ROMEO:")])
    tokens = sampling.generate(run.task.model, jax.device_get(state.params), prompt, 40, temperature=0.0)
    assert result.stdout == "ROMEO:" + run.tokenizer.decode(tokens[0].tolist()) + "\n"


@needs_shakespeare
def test_a_non_finite_loss_stops_the_run_naming_the_step_and_saves_nothing_after_it(data_dir, tmp_path):
    config = tiny_config(data_dir, steps=20, steps_per_call=1)
    config.optim.update(dict(lr=1e12, warmup_steps=0, clip_norm=0.0))
    config.checkpoint.every = 1
    with pytest.raises(loop.NonFiniteLoss, match=r"at step (\d+)") as error:
        train(config, tmp_path)
    bad_step = int(re.search(r"at step (\d+)", str(error.value)).group(1))
    saved = checkpoint.Checkpointer(str(tmp_path), read_only=True).latest_step()
    assert saved is None or saved < bad_step

    config.train.nan_policy = "skip"  # every step diverges: skipping them all is no progress
    with pytest.raises(loop.NonFiniteLoss, match="non-finite and skipped"):
        train(config, tmp_path / "skip")


@needs_shakespeare
def test_evaluate_reproduces_the_runs_last_eval_and_writes_it(data_dir, tmp_path):
    from jaxlm import evaluate
    train(tiny_config(data_dir, steps=5), tmp_path)
    metrics = evaluate.evaluate(str(tmp_path), eval_batches=2)
    assert metrics["step"] == 5
    assert metrics["eval/loss"] == pytest.approx(read_metrics(tmp_path, "eval/loss")[5], rel=1e-6)
    with open(tmp_path / "eval" / "validation" / "metrics.json") as f:
        assert json.load(f) == metrics
    whole = evaluate.evaluate(str(tmp_path))  # the whole split: another figure
    assert whole["eval/loss"] != metrics["eval/loss"]


@needs_shakespeare
def test_a_run_that_cannot_restore_the_workdir_changes_nothing_in_it(data_dir, tmp_path):
    train(tiny_config(data_dir, steps=5), tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "tensorboard" not in p.parts}
    config = tiny_config(data_dir, steps=10)
    config.model.emb_dim = 64  # another model: refused before the checkpoint is read
    with pytest.raises(ValueError, match=r"resumes at step 5, but model.emb_dim=64 \(saved 32\)"):
        train(config, tmp_path)
    config = tiny_config(data_dir, steps=10)
    config.optim.clip_norm = 0.0  # another optimizer state layout: the checkpoint cannot be restored
    with pytest.raises(ValueError, match=r"step 5 .* does not fit"):
        train(config, tmp_path)
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "tensorboard" not in p.parts}
    assert after == before


@needs_shakespeare
def test_init_from_loads_only_the_parameters_of_another_run(data_dir, tmp_path):
    source = train(tiny_config(data_dir, steps=5), tmp_path / "source")
    config = tiny_config(data_dir, steps=0)
    config.optim.clip_norm = 0.0  # another optimizer state layout: only the parameters carry over
    config.init_from = str(tmp_path / "source")
    state = train(config, tmp_path / "target")
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(source.params)):
        np.testing.assert_array_equal(a, b)
    assert int(state.step) == 0

    config = tiny_config(data_dir, steps=0)
    config.model.emb_dim = 64  # the architecture comes from the source run, as from a HF config
    config.init_from = str(tmp_path / "source")
    state = train(config, tmp_path / "adopted")
    assert config.model.emb_dim == 32
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(source.params)):
        np.testing.assert_array_equal(a, b)


@needs_shakespeare
def test_profile_steps_trace_the_steps_after_the_first_call_and_the_report_reads_them(data_dir, tmp_path):
    """`train.profile_steps` leaves the losses alone and writes a trace of its steps (not the
    first call, which compiles) that tools/profile_report.py sums by kind of op and part of the
    model (the tiny model's ops run on the Python thread: they still count as device ops)."""
    train(tiny_config(data_dir), tmp_path / "plain")
    train(tiny_config(data_dir, profile_steps=5), tmp_path / "traced")
    assert read_metrics(tmp_path / "traced") == read_metrics(tmp_path / "plain")
    traces = list((tmp_path / "traced" / "profile").rglob("perfetto_trace.json.gz"))
    assert len(traces) == 1
    report = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "tools" / "profile_report.py"),
                             str(tmp_path / "traced"), "--steps=5"], check=True, capture_output=True, text=True).stdout
    assert "per step of 5" in report and "| matmul |" in report, report
    # the parts come from the HLO the trainer wrote beside the trace; every traced op of the
    # train call is in it (the per-step finiteness check is another program); no Python frame is an op
    for part in ("forward: attention", "backward: MLP", "optimizer, gradient clipping, step"):
        assert f"| {part} |" in report, report
    assert "not in the HLO written" not in report and "$" not in report.split("top 15 ops")[1], report


def test_the_profile_report_reads_an_ops_kind_from_what_it_computes_and_its_part_from_its_op_name():
    spec = importlib.util.spec_from_file_location("profile_report", Path(__file__).parents[1] / "tools" / "profile_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    grad = jax.jit(jax.value_and_grad(lambda w, x: jnp.sum(jnp.tanh(x @ w) ** 2)))
    module, ops = report.read_hlo(grad.lower(jnp.ones((64, 64)), jnp.ones((32, 64))).compile().as_text())
    assert module.startswith("jit_") and {"matmul", "reduction"} <= {op.kind for op in ops.values()}, ops
    step = "jit(steps)/while/body/closed_call/"
    assert report.part_of(step + "transpose(jvp(GPT))/decoder/layers_0/attn/dot_general") == "backward: attention"
    assert report.part_of(step + "jvp(GPT)/decoder/layers_1/mlp_norm/mul") == "forward: norms"
    assert report.part_of(step + "jvp(GPT)/decoder/layers_1/mlp/dot_general") == "forward: MLP"
    assert report.part_of(step + "jit(clip)/mul") == "optimizer, gradient clipping, step"


@needs_shakespeare
def test_a_persistent_compilation_cache_hit_trains_the_same_losses(data_dir, tmp_path, monkeypatch):
    """`train.compilation_cache`: a second run loads the first one's compiled programs from disk
    (JAX's in-memory caches cleared in between, as in a new process) and trains the same losses."""
    monkeypatch.setattr(compile_cache, "MIN_COMPILE_SECONDS", 0.0)  # the tiny model compiles fast
    cache = tmp_path / "xla"
    hits = []

    def count_hits(event, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            hits.append(event)

    jax.monitoring.register_event_listener(count_hits)
    try:
        train(tiny_config(data_dir, compilation_cache=str(cache)), tmp_path / "first")
        written = len(list(cache.glob("*-cache")))
        jax.clear_caches()
        hits.clear()
        train(tiny_config(data_dir, compilation_cache=str(cache)), tmp_path / "second")
    finally:
        jax.monitoring.unregister_event_listener(count_hits)
        compile_cache.use(config_lib.default_config().train.compilation_cache)
    # init, the train call, eval ...: every program the first run wrote, the second one loaded
    # (a program this process had compiled before the first run is first written by the second)
    assert written >= 3 and len(hits) >= written, (written, hits)
    assert read_metrics(tmp_path / "second") == read_metrics(tmp_path / "first")
    assert read_metrics(tmp_path / "first", "eval/loss") == read_metrics(tmp_path / "second", "eval/loss")


@pytest.mark.parametrize("scan_layers", [False, True])
def test_layer_decay_scales_each_parameters_update_by_its_depth(scan_layers):
    """optim.layer_decay=0.5 on a 2-layer GPT: the same AdamW update times 0.5^3 for the token and
    position tables, 0.5^2 in layer 0, 0.5 in layer 1 and 1 for the final norm, whether the
    layers are unrolled (`layers_0`, `layers_1`) or scanned (one `layers` array per parameter)."""
    from jaxlm import models  # pylint: disable=import-outside-toplevel

    c = config_lib.default_config()
    c.model.update(dict(vocab_size=50, max_len=16, num_layers=2, num_heads=2, emb_dim=16, scan_layers=scan_layers))
    model = models.get(c.model)
    params = jax.tree.map(lambda p: p.value, model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"],
                          is_leaf=lambda p: hasattr(p, "value"))
    grads = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size, dtype=p.dtype).reshape(p.shape)), params)

    def update(decay):
        c.optim.update(dict(layer_decay=decay, schedule="constant", warmup_steps=0, weight_decay=0.1))
        tx, _ = optim.make(c.optim, 10)
        return tx.update(grads, tx.init(params), params)[0]

    plain, decayed = update(1.0), update(0.5)
    assert all(np.count_nonzero(leaf) == leaf.size for leaf in jax.tree.leaves(plain))
    ratio = jax.tree.map(lambda d, p: np.asarray(d / jnp.where(p == 0, 1, p)), decayed, plain)
    expected = {"embed": 0.125, "pos_embedding": 0.125, "final_norm": 1.0}
    for name, value in expected.items():
        for leaf in jax.tree.leaves(ratio[name]):
            np.testing.assert_allclose(leaf[np.asarray(leaf) != 0], value, rtol=1e-5, err_msg=name)
    layers = ratio["decoder"]
    for i, value in enumerate((0.25, 0.5)):
        for leaf in jax.tree.leaves(layers["layers"] if scan_layers else layers[f"layers_{i}"]):
            leaf = leaf[i] if scan_layers else leaf
            np.testing.assert_allclose(leaf[leaf != 0], value, rtol=1e-5, err_msg=f"layer {i}")
