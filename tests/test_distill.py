"""Knowledge distillation (task `distillation`): the loss against numpy, equality with plain
fine-tuning, a frozen teacher that stays out of checkpoints, layer copies and the matching terms."""

import json
import logging
import os
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import config as config_lib, tree
from jaxlm.compress import distill
from jaxlm.train import loop

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import teacher_logits as teacher_logits_tool  # noqa: E402 (tools/ is not a package)


@pytest.fixture(scope="module")
def teacher(tiny_finetune, tmp_path_factory):
    """A tiny SST-2 teacher run (2 layers, 32 wide, 3 steps)."""
    workdir = str(tmp_path_factory.mktemp("distill") / "teacher")
    loop.train_and_evaluate(tiny_finetune("sst2.py"), workdir)
    return workdir


@pytest.fixture
def student(tiny_finetune, teacher):
    """`make(**distill)`: configs/distill_sst2.py on the tiny model: a 1-layer student of the
    teacher's width, starting from the teacher's layer 1."""
    def make(**values):
        config = tiny_finetune("distill_sst2.py", "distill")
        config.model.num_layers = 1
        config.distill.update(dict(teacher=teacher, init_layers="1", temperature=3.0, soft_weight=0.7,
                                   hard_weight=0.3))
        config.distill.update(values)
        return config
    return make


def flat(tree) -> dict:
    return {"/".join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(jax.device_get(tree)).items()}


def assert_same(a, b):
    a, b = flat(a), flat(b)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def first_batch(run, ignored_rows=()):
    batch = next(iter(run.task.train_iterator()))
    batch["label"][list(ignored_rows)] = -1
    return jax.tree.map(jnp.asarray, batch)


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_layer_map_and_scanned_copies():
    assert distill.layer_map(3, 6) == [1, 3, 5]
    assert distill.layer_map(2, 4) == [1, 3]
    teacher = {"embed": np.ones((5, 4)), "encoder": {"layers": {"w": np.arange(24.0).reshape(6, 2, 2)}}}
    shapes = {"embed": np.zeros((5, 4)), "encoder": {"layers": {"w": np.zeros((2, 2, 2))}}}
    copied = distill.student_from_teacher(teacher, shapes, [4, 1])
    np.testing.assert_array_equal(copied["encoder"]["layers"]["w"], teacher["encoder"]["layers"]["w"][[4, 1]])
    np.testing.assert_array_equal(copied["embed"], teacher["embed"])


def test_a_scratch_student_starts_from_random_weights_and_alone_reads_no_teacher(tiny_finetune, teacher, tmp_path):
    """configs/distill_sst2.py:scratch: a student of random weights (nothing copied from the
    teacher) that learns from the teacher's soft targets only; :scratch_alone: the same student,
    the same weights, on the labels only, with no teacher loaded."""
    runs, states = {}, {}
    for arg in ("scratch", "scratch_alone"):
        config = tiny_finetune("distill_sst2.py", arg)
        config.model.num_layers = 1
        config.distill.teacher = teacher
        runs[arg] = loop.setup(config, str(tmp_path / arg))
        states[arg] = loop.base_params(runs[arg])[0]
        assert config.optim.lr == 5e-4 and config.distill.init_layers == ""
    assert runs["scratch"].task.teacher is not None and runs["scratch_alone"].task.teacher is None
    assert (runs["scratch"].config.distill.soft_weight, runs["scratch"].config.distill.hard_weight) == (1.0, 0.0)
    student = {k: v for k, v in states["scratch"].model_params.items() if k != "teacher"}
    assert_same(student, states["scratch_alone"].model_params)
    teachers = flat(states["scratch"].model_params["teacher"])
    shared = [name for name, value in flat(student).items()  # the random matrices (norms start at 1)
              if name in teachers and teachers[name].shape == value.shape and name.endswith(("kernel", "embedding"))]
    assert {"embed/embedding", "encoder/layers_0/attn/query/kernel", "pooler/kernel"} <= set(shared), shared
    for name in shared:
        assert not np.array_equal(flat(student)[name], teachers[name]), f"{name} was copied from the teacher"


def test_loss_matches_numpy(student, tmp_path):
    run = loop.setup(student(), str(tmp_path))
    state, _ = loop.base_params(run)
    params = state.model_params
    for subtree, seed in ((params, 1), (params["teacher"], 2)):  # heads far apart: a KL well above 0
        kernel = subtree["classifier"]["kernel"]
        subtree["classifier"]["kernel"] = 3 * jax.random.normal(jax.random.key(seed), kernel.shape)
    batch = first_batch(run, ignored_rows=(1, 5))
    total, sums = run.task.loss(params, batch)

    task = run.task
    s = np.float64(task.student.forward({k: v for k, v in params.items() if k != "teacher"}, batch)["classifier"])
    t = np.float64(task.teacher.forward(params["teacher"], batch)["classifier"])
    labels = np.asarray(batch["label"])
    keep = labels >= 0
    ce = -log_softmax(s)[np.arange(len(labels)), np.maximum(labels, 0)]
    pt, T = np.exp(log_softmax(t / 3.0)), 3.0
    kl = T ** 2 * (pt * (log_softmax(t / T) - log_softmax(s / T))).sum(-1)
    expected = 0.3 * ce[keep].sum() + 0.7 * kl[keep].sum()
    np.testing.assert_allclose(total, expected, rtol=1e-5)
    np.testing.assert_allclose(sums["kl"], kl[keep].sum(), rtol=1e-5)
    np.testing.assert_allclose(sums["hard_loss"], ce[keep].sum(), rtol=1e-5)
    assert sums["weight"] == keep.sum()
    metrics = task.summarize(sums)
    np.testing.assert_allclose(metrics["loss"], ce[keep].mean(), rtol=1e-5)  # the student's CE
    np.testing.assert_allclose(metrics["distill_loss"], expected / keep.sum(), rtol=1e-5)


@pytest.mark.slow  # two tiny runs and their gradients (~40 s)
def test_hard_labels_only_equals_plain_finetuning(student, tiny_finetune, tmp_path):
    distilled = student(temperature=1.0, soft_weight=0.0, hard_weight=1.0, init_layers="")
    plain = tiny_finetune("sst2.py")
    plain.model.update(distilled.model.to_dict())  # MiniLM's norm_eps, 1 layer
    plain.optim.update(distilled.optim.to_dict())
    runs = [loop.setup(c, str(tmp_path / name)) for c, name in ((plain, "plain"), (distilled, "distilled"))]
    params = [loop.base_params(run)[0].params for run in runs]
    assert_same(params[0], params[1])  # the same seed gives the same student
    batch, rng = first_batch(runs[0]), jax.random.key(3)
    grads = [jax.grad(lambda p: run.task.loss(p, batch, rng, train=True)[0])(params[0]) for run in runs]
    a, b = flat(grads[0]), flat(grads[1])  # the same dropout masks, the same arithmetic
    for name in a:  # up to the last bit: rounding differs by an ulp where XLA fuses differently
        np.testing.assert_allclose(a[name], b[name], rtol=1e-6, atol=1e-10, err_msg=name)
    for config, name in ((plain, "plain"), (distilled, "distilled")):
        loop.train_and_evaluate(config, str(tmp_path / name))
    losses = [[m["train/loss"] for m in metrics_lines(tmp_path / d)] for d in ("plain", "distilled")]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)


def metrics_lines(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if "train/loss" in line]


@pytest.mark.slow
def test_teacher_is_frozen_out_of_checkpoints_and_resumes(student, teacher, tmp_path, caplog):
    config = student()
    teacher_params = loop.restore_latest(teacher)[1]
    straight = loop.train_and_evaluate(config, str(tmp_path / "straight"))
    assert_same(straight.frozen["teacher"], teacher_params)  # bit-identical after training
    assert "teacher" not in flat(straight.params) and not any(n.startswith("teacher") for n in flat(straight.params))

    workdir = str(tmp_path / "resumed")
    config.train.steps = 2
    config.checkpoint.every = 2
    loop.train_and_evaluate(config, workdir)
    metadata = open(os.path.join(workdir, "checkpoints", "2", "state", "_METADATA")).read()
    assert "classifier" in metadata and "teacher" not in metadata
    config.train.steps = 3
    with caplog.at_level(logging.INFO, logger=loop.log.name):
        resumed = loop.train_and_evaluate(config, workdir)
    assert f"step 2 (frozen parameters from {config.distill.teacher})" in caplog.text  # names the teacher
    assert_same(resumed.params, straight.params)
    assert_same(resumed.frozen, straight.frozen)


def test_init_layers_copies_the_teacher(student, teacher, tmp_path):
    run = loop.setup(student(init_layers="1", soft_weight=0.0, hard_weight=1.0), str(tmp_path))
    state, _ = loop.base_params(run)
    assert not state.frozen  # a teacher that does not run stays out of the state
    got, want = flat(state.params), flat(loop.restore_latest(teacher)[1])
    for name in ("attn/query/kernel", "mlp/wo/kernel", "mlp_norm/scale"):
        np.testing.assert_array_equal(got[f"encoder/layers_0/{name}"], want[f"encoder/layers_1/{name}"])
    for name in ("embed/embedding", "pooler/kernel", "classifier/kernel"):
        np.testing.assert_array_equal(got[name], want[name])
    assert not np.array_equal(want["encoder/layers_0/attn/query/kernel"], want["encoder/layers_1/attn/query/kernel"])


@pytest.mark.slow
@pytest.mark.parametrize("term", ["hidden", "attention"])
def test_matching_terms_train_the_student(student, tmp_path, term):
    config = student(soft_weight=0.0, hard_weight=0.0, init_layers="", **{f"{term}_weight": 1.0})
    run = loop.setup(config, str(tmp_path))
    state, _ = loop.base_params(run)
    batch = first_batch(run)
    grads, sums = jax.grad(lambda p: run.task.loss(tree.join(p, state.frozen), batch), has_aux=True)(state.params)
    assert sums[term] > 0 and np.isclose(sums["loss"], sums[term])
    grads = flat(grads)
    assert np.abs(grads["encoder/layers_0/attn/query/kernel"]).sum() > 0
    if term == "hidden":  # the projection trains
        assert np.abs(grads["distill/layer_0/kernel"]).sum() > 0


@pytest.mark.slow
def test_precomputed_logits_train_like_the_live_teacher(student, teacher, tmp_path):
    path = str(tmp_path / "logits.npy")
    np.save(path, teacher_logits_tool.teacher_logits(teacher))
    live = loop.train_and_evaluate(student(), str(tmp_path / "live"))
    precomputed = loop.train_and_evaluate(student(teacher_logits=path), str(tmp_path / "precomputed"))
    a, b = flat(live.params), flat(precomputed.params)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=1e-6, err_msg=name)
    assert set(flat(precomputed.frozen)) == {"teacher/precomputed_logits"}


@pytest.mark.slow
def test_the_distilled_run_evaluates_as_the_student(student, tmp_path):
    from jaxlm import evaluate
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(student(), workdir)
    metrics = evaluate.evaluate(workdir)
    assert 0 <= metrics["accuracy"] <= 1 and metrics["examples"] > 0


def test_bad_settings_name_the_key(student, tmp_path):
    cases = [(dict(teacher=""), "distill.teacher is empty"),
             (dict(student_task="mlm_nsp"), "distill.student_task='mlm_nsp'"),
             (dict(init_layers="0,1"), "distill.init_layers='0,1'"),
             (dict(temperature=0.0), "distill.temperature"),
             (dict(teacher=str(tmp_path)), "distill.teacher=")]
    for values, match in cases:
        with pytest.raises(ValueError, match=match):
            loop.setup(student(**values), str(tmp_path / "run"))
    config = student()
    config.model.vocab_size = 30600
    with pytest.raises(ValueError, match="distill.teacher=.*vocabulary"):
        loop.setup(config, str(tmp_path / "run"))
    assert config_lib.default_config().distill.soft_weight == 0.5
