"""Pruning: masks follow the schedule, pruned weights stay zero through Adam and resume, N:M groups
keep exactly N, and a head-pruned model exports to a smaller one that computes the same logits."""

import json
import os
import shutil
import sys

import flax
import jax
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import evaluate, tree
from jaxlm.compress import prune
from jaxlm.data import builders
from jaxlm.train import checkpoint, loop, metrics as metrics_lib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import prune_export  # noqa: E402 (tools/ is not a package)


def flat(tree) -> dict:
    return {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(jax.device_get(tree), sep="/").items()}


def scheduled(t: int, initial_sparsity: float, sparsity: float, begin_step: int, end_step: int,
              every: int) -> float:
    """The sparsity the masks have after the step that starts with `t` steps done (Zhu & Gupta:
    updates at begin, begin + every, ..., and end)."""
    if t < begin_step:
        return 0.0
    last_update = min(begin_step + (t - begin_step) // every * every, end_step)
    progress = (last_update - begin_step) / (end_step - begin_step)
    return sparsity + (initial_sparsity - sparsity) * (1 - progress) ** 3


def masks_of(state) -> dict:
    """The masks the state holds (in its optimizer state): those of the step it starts next."""
    return flat(prune.masks(state.opt_state))


def assert_masked_zero(state):
    params = flat(state.params)
    for name, mask in masks_of(state).items():
        assert np.all(params[name][~mask] == 0), name


# --- The masks the step computes, against their definition ------------------------------------

def pruner(**settings):
    config = config_lib.default_config()
    config.train.steps = 10
    config.prune.update(settings)
    prune.check(config)
    rng = np.random.default_rng(0)
    params = {"a": {"kernel": rng.normal(size=(3, 8, 5)).astype(np.float32)},  # a stack of 3 layers
              "b": {"kernel": rng.normal(size=(8, 6)).astype(np.float32)}}
    axes = {"a/kernel": ("layers", "embed", "mlp"), "b/kernel": ("mlp", "embed")}
    shapes = {n: v.shape for n, v in flat(params).items()}
    return prune.Pruner(config.prune, axes, shapes), params


def assert_smallest_dropped(weights, keep, sparsity):
    magnitudes = np.abs(weights).ravel()
    keep = keep.ravel()
    assert (~keep).sum() == round(sparsity * keep.size)
    assert magnitudes[~keep].max() < magnitudes[keep].min()


def test_layer_and_global_masks_drop_the_smallest_weights():
    p, params = pruner(method="magnitude", sparsity=0.3, scope="layer")
    masks, weights = flat(p.recompute(params, 0)), flat(params)
    for layer in range(3):  # every layer of the stack on its own
        assert_smallest_dropped(weights["a/kernel"][layer], masks["a/kernel"][layer], 0.3)
    assert_smallest_dropped(weights["b/kernel"], masks["b/kernel"], 0.3)

    p, params = pruner(method="magnitude", sparsity=0.3, scope="global")
    masks = flat(p.recompute(params, 0))
    assert_smallest_dropped(np.concatenate([weights["a/kernel"].ravel(), weights["b/kernel"].ravel()]),
                            np.concatenate([masks["a/kernel"].ravel(), masks["b/kernel"].ravel()]), 0.3)
    per_layer = (~masks["a/kernel"]).reshape(3, -1).sum(1)
    assert len(set(per_layer)) > 1  # global: the layers lose different shares


def test_two_of_four_keeps_the_two_largest_of_each_group_of_inputs():
    p, params = pruner(method="nm", n=2, m=4)
    masks, weights = flat(p.recompute(params, 0)), flat(params)
    # 'a' [layers, embed (inputs), mlp]: groups of 4 along axis 1; 'b' [mlp (inputs), embed]: axis 0
    for w, keep in ((weights["a/kernel"].transpose(0, 2, 1), masks["a/kernel"].transpose(0, 2, 1)),
                    (weights["b/kernel"].T, masks["b/kernel"].T)):
        groups, kept = np.abs(w).reshape(-1, 4), keep.reshape(-1, 4)
        assert np.all(kept.sum(1) == 2)
        largest = np.sort(groups, axis=1)[:, 2:]
        np.testing.assert_array_equal(np.sort(np.where(kept, groups, 0), axis=1)[:, 2:], largest)


# --- Through the trainer, on a tiny BERT fine-tuned on SST-2 -----------------------------------

SCHEDULE = dict(initial_sparsity=0.2, sparsity=0.8, begin_step=1, end_step=7, every=2)


def train_calls(config, workdir: str, calls: int):
    """Yields (steps done, state, per-step metrics) after each of `calls` jitted calls of
    `train.steps_per_call` steps, from a fresh start as the trainer makes it."""
    run = loop.setup(config, workdir)
    state = prune.start(run, loop.base_params(run)[0])
    call = loop.make_train_call(run)
    batches = run.task.train_iterator()
    k = config.train.steps_per_call
    for i in range(calls):
        stack = loop._stack([next(batches) for _ in range(k)])
        state, metrics = call(state, run.partitioner.shard_batch(stack, loop.STACKED))
        yield (i + 1) * k, state, metrics


@pytest.mark.parametrize("steps_per_call,scope,scan", [pytest.param(1, "layer", False, marks=pytest.mark.slow),
                                                       (3, "global", True)])
def test_sparsity_follows_the_polynomial_schedule(tiny_finetune, tmp_path, steps_per_call, scope, scan):
    """Magnitude pruning from 20% at step 1 to 80% at step 7, every 2 steps: after every step the
    masks hold the schedule's sparsity, in every kernel (and every layer of a stacked kernel)
    with scope 'layer', over all of them with 'global'."""
    config = tiny_finetune()
    config.model.scan_layers = scan
    config.train.update(dict(steps=9, steps_per_call=steps_per_call))
    config.prune.update(dict(method="magnitude", scope=scope, **SCHEDULE))
    logged = []
    for done, state, metrics in train_calls(config, str(tmp_path), 9 // steps_per_call):
        logged += list(np.asarray(metrics["sparsity"]))
        want = scheduled(done, **SCHEDULE)  # the masks of the next step, as its loss will see them
        masks = masks_of(state)
        if scope == "global":
            zeros = sum((~m).sum() for m in masks.values())
            assert abs(zeros - want * sum(m.size for m in masks.values())) <= 0.5
        else:
            for name, mask in masks.items():
                for layer in (mask if scan else mask[None]):
                    assert abs((~layer).sum() - want * layer.size) <= 0.5, (done, name)
        assert_masked_zero(state)
    sizes = [m.size for m in masks_of(state).values()]
    expected = [scheduled(t, **SCHEDULE) for t in range(9)]
    np.testing.assert_allclose(logged, expected, atol=len(sizes) * (1 + scan) / sum(sizes))
    assert len(set(np.round(expected, 6))) == 5  # 0, then four updates: the test sees every level


def test_pruned_weights_stay_zero_through_adam_and_resume(tiny_finetune, tmp_path):
    """Weights pruned at step 1 have Adam moments from step 0 (and weight decay pulls on every
    weight): without the masks applied after each update they would move. The run resumed from
    its step-2 checkpoint equals the uninterrupted run, masks included."""
    config = tiny_finetune()
    config.train.update(dict(steps=4, eval_every=4))
    config.checkpoint.every = 2
    config.optim.update(dict(weight_decay=0.1))
    config.prune.update(dict(method="magnitude", sparsity=0.6, begin_step=0, end_step=1, every=1))
    straight = loop.train_and_evaluate(config, str(tmp_path / "straight"))
    workdir = str(tmp_path / "resumed")
    shutil.copytree(tmp_path / "straight", workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))  # as if stopped at step 2
    resumed = loop.train_and_evaluate(config, workdir)
    assert int(resumed.step) == 4

    masks = masks_of(straight)
    for name, mask in masks_of(resumed).items():
        np.testing.assert_array_equal(mask, masks[name], err_msg=name)
        assert abs((~mask).sum() - 0.6 * mask.size) <= 0.5, name
    for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    assert_masked_zero(straight)
    assert_masked_zero(resumed)
    adam = [s for s in jax.tree.leaves(straight.opt_state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")]
    mu = flat(adam[0].mu)
    assert any(np.any(mu[name][~mask] != 0) for name, mask in masks.items())  # they would have moved
    logged = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    sparsity = {row["step"]: row["train/sparsity"] for row in logged if "train/sparsity" in row}
    assert sparsity[1] == 0.0 and sparsity[2] == pytest.approx(0.6, abs=1e-3) == sparsity[4]


@pytest.mark.slow  # the mask-level 2:4 test above is in the fast suite
def test_two_of_four_holds_after_training(tiny_finetune, tmp_path):
    config = tiny_finetune()
    config.prune.update(dict(method="nm", n=2, m=4))  # one-shot before the first step
    *_, (_, state, _) = train_calls(config, str(tmp_path), 3)
    emb, heads, head_dim = 32, 2, 16
    checked = 0
    for name, w in flat(state.params).items():
        if not name.endswith("kernel") or "layers_" not in name:
            continue
        inputs_first = w.reshape(heads * head_dim, emb) if "attn/out" in name else w.reshape(w.shape[0], -1)
        groups = (inputs_first.reshape(-1, 4, inputs_first.shape[1]) != 0).sum(1)
        assert np.all(groups == 2), name
        checked += 1
    assert checked == 2 * 6  # q, k, v, out, wi, wo in both layers


@pytest.mark.slow  # two tiny runs, an export and an evaluation (~35 s each)
@pytest.mark.parametrize("scan", [False, True])
def test_an_exported_head_pruned_model_computes_what_the_masked_one_did(tiny_finetune, tmp_path, scan):
    config = tiny_finetune()
    config.model.scan_layers = scan
    config.prune.update(dict(method="heads", heads_pruned=0.5, mlp_pruned=0.25, importance_batches=2))
    workdir, small = str(tmp_path / "heads"), str(tmp_path / "small")
    loop.train_and_evaluate(config, workdir)
    assert prune_export.export(workdir, small) == 3

    run, params, _ = loop.restore_latest(workdir)
    small_run, small_params, _ = loop.restore_latest(small)
    m = small_run.config.model
    assert (m.num_heads, m.head_dim, m.mlp_dim, small_run.config.prune.method) == (1, 16, 48, "none")
    batch = next(iter(run.task.eval_batches("validation", 1)))
    want = run.task.forward(params, batch)["classifier"]
    got = small_run.task.forward(small_params, batch)["classifier"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # Per layer: one head (q, k, v kernels and biases, out rows) and 16 neurons (wi column and
    # bias, wo row) of a 32-wide model with 16-wide heads.
    head = 3 * (32 * 16 + 16) + 16 * 32
    neurons = 16 * (32 + 1 + 32)
    removed = metrics_lib.count_params(params) - metrics_lib.count_params(small_params)
    assert removed == 2 * (head + neurons)
    # And through jaxlm.evaluate, on the first 24 SST-2 dev sentences: the same predictions.
    dev = builders.jaxlm_data_dir() / "sst2" / "dev.tsv"
    sentences = str(tmp_path / "dev24.tsv")
    with open(sentences, "w") as f:
        f.writelines(open(dev).readlines()[:25])
    assert evaluate.evaluate(small, data_path=sentences)["examples"] == 24
    rows = [json.loads(line) for line in open(os.path.join(small, "eval", "dev24.tsv", "predictions.jsonl"))]
    _, masked_rows = run.task.predictions(params, "", sentences)
    assert [r["prediction"] for r in rows] == [r["prediction"] for r in masked_rows]
    np.testing.assert_allclose([r["probability"] for r in rows], [r["probability"] for r in masked_rows],
                               rtol=1e-5)


# --- Bad settings ------------------------------------------------------------------------------

@pytest.mark.parametrize("settings,message", [
    (dict(method="lottery"), "prune.method='lottery'"),
    (dict(method="magnitude", sparsity=1.0), "prune.sparsity=1.0"),
    (dict(method="magnitude", scope="model"), "prune.scope='model'"),
    (dict(method="magnitude", initial_sparsity=0.6, sparsity=0.5), "prune.initial_sparsity=0.6"),
    (dict(method="magnitude", begin_step=5, end_step=2), "prune.end_step=2"),
    (dict(method="magnitude", end_step=3), "prune.end_step=3"),  # train.steps=3: never reached
    (dict(method="magnitude", every=0), "prune.every=0"),
    (dict(method="magnitude", targets="(attn"), "prune.targets='\\(attn'"),
    (dict(method="nm", n=4, m=4), "prune.n=4"),
    (dict(method="heads"), "prune.heads_pruned or prune.mlp_pruned"),
    (dict(method="heads", heads_pruned=0.8), "prune.heads_pruned=0.8"),
    (dict(method="heads", mlp_pruned=0.5, importance_batches=0), "prune.importance_batches=0"),
])
def test_bad_values_name_the_key(tiny_finetune, settings, message):
    config = tiny_finetune()
    config.prune.update(settings)
    with pytest.raises(ValueError, match=message):
        prune.check(config)


def test_targets_that_match_nothing_or_only_frozen_parameters_are_errors(tiny_finetune, tmp_path):
    config = tiny_finetune()
    config.prune.update(dict(method="magnitude", targets="no_such_layer"))
    with pytest.raises(ValueError, match="prune.targets='no_such_layer' matches no parameter"):
        loop.setup(config, str(tmp_path))
    config.prune.targets = config_lib.default_config().prune.targets
    config.peft.frozen = "attn|mlp"
    with pytest.raises(ValueError, match="would prune frozen parameters .*attn/"):
        loop.setup(config, str(tmp_path))
    config.peft.frozen = "attn"  # the MLP kernels still train: only they get masks
    masked = tree.names(prune.masks(loop.setup(config, str(tmp_path)).shardings.opt_state))
    assert masked and all("/mlp/" in n for n in masked)
    config.peft.frozen = ""
    config.prune.update(dict(method="nm", m=5))
    with pytest.raises(ValueError, match="prune.m=5 does not divide"):
        loop.make_train_call(loop.setup(config, str(tmp_path)))


# --- The trainer's view: an optimizer, and checkpoints of the earlier layout ---------------------

@flax.struct.dataclass
class EarlierTrainState:
    """The train state as jaxlm saved it before the masks moved into the optimizer state."""
    step: jax.Array
    params: dict
    opt_state: object
    frozen: dict
    masks: dict

    def saved(self):
        return self


def test_masks_live_in_the_optimizer_state_sharded_like_their_parameters(tiny_finetune, tmp_path):
    config = tiny_finetune()
    config.mesh.update(dict(num_devices=0, data=2, fsdp=-1))  # all the test's devices: params split
    config.prune.update(dict(method="magnitude", sparsity=0.5))
    run = loop.setup(config, str(tmp_path))
    assert not hasattr(run.shardings, "masks")
    shardings = lambda nested: flax.traverse_util.flatten_dict(nested, sep="/")
    params = shardings(run.shardings.params)
    masks = shardings(prune.masks(run.shardings.opt_state))
    assert masks and all("kernel" in n for n in masks)
    for name, sharding in masks.items():
        assert sharding == params[name], name
    assert any(not s.is_fully_replicated for s in masks.values()) or jax.device_count() == 1
    config.prune.method = "none"
    assert prune.optimizer(run.tx, config, run.task, run.partitioner) is run.tx


def test_an_earlier_pruned_checkpoint_fails_naming_the_change(tiny_finetune, tmp_path):
    """A checkpoint with the masks in `state.masks` (jaxlm before they moved into the optimizer
    state) is an error that names the move, when a run resumes it and when the export reads it;
    the checkpoint is left as it was."""
    config = tiny_finetune()
    config.prune.update(dict(method="heads", heads_pruned=0.5))
    workdir = str(tmp_path / "earlier")
    run = loop.setup(config, workdir)
    state = loop.base_params(run)[0]
    earlier = EarlierTrainState(step=state.step, params=state.params, opt_state=state.opt_state.inner_state,
                                frozen={}, masks=prune.masks(state.opt_state))
    ckpt = checkpoint.Checkpointer(workdir, async_save=False)
    ckpt.save(2, earlier)
    ckpt.close()
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints", "2", "state")))
    message = r"earlier jaxlm: pruning masks moved from the train state \(state.masks\) into the optimizer state"
    with pytest.raises(ValueError, match=message):
        loop.train_and_evaluate(config, workdir)
    with pytest.raises(ValueError, match=message):
        prune_export.restore_masks(run, workdir, 2)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints", "2", "state"))) == before
    params, step = checkpoint.restore_params(workdir, run.abstract_state.params)  # what inference reads
    assert step == 2 and tree.names(params) == tree.names(state.params)
