"""Parameter-efficient fine-tuning: new adapters start as the identity, LoRA merges exactly, and
a PEFT run trains, optimizes and saves only its trainable parameters."""

import json
import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import models, peft, tree
from jaxlm.models import layers
from jaxlm.peft import lora, prompts
from jaxlm.train import checkpoint, loop

HEADS = (("classifier", "pooled", 2),)


def tiny_model_config(scan: bool = False):
    m = config_lib.default_config().model
    m.update(dict(name="bert", vocab_size=64, num_layers=2, emb_dim=32, num_heads=2, mlp_dim=64,
                  max_len=16, use_bias=True, mlp="gelu_exact", scan_layers=scan))
    return m


def build(method: str, scan: bool = False, **settings):
    return peft.attach(models.get(tiny_model_config(scan), None, heads=HEADS), peft.Peft(method=method, **settings))


def batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 64, (3, 16)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 10:] = 0
    return dict(input_ids=ids, segment_ids=np.zeros_like(ids), input_mask=mask)


def base_and_peft(method, scan=False, **settings):
    """(base model, base params, PEFT model, PEFT params holding the base's values)."""
    base = build("full", scan)
    base_params = nn.unbox(base.init(jax.random.key(0), **batch())["params"])
    tuned = build(method, scan, **settings)
    tuned_params = nn.unbox(tuned.init(jax.random.key(1), **batch())["params"])
    own = [n for n in tree.names(tuned_params) if n not in set(tree.names(base_params))]
    assert own, f"{method} added no parameters"
    new, _ = tree.split(tuned_params, lambda n: n in own)
    return base, base_params, tuned, tree.join(new, base_params)


@pytest.mark.parametrize("method,settings", [("lora", dict(targets="query|value|wo")),
                                             ("adapter", dict(adapter="houlsby")),
                                             ("adapter", dict(adapter="pfeiffer"))])
def test_new_adapters_reproduce_the_base_model_exactly(method, settings):
    base, base_params, tuned, params = base_and_peft(method, scan=True, **settings)
    want = base.apply({"params": base_params}, **batch())
    got = tuned.apply({"params": params}, **batch())
    # Exact up to float32 rounding: XLA fuses the extra (zero) terms differently.
    np.testing.assert_allclose(got["hidden"], want["hidden"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(got["classifier"], want["classifier"], rtol=0, atol=1e-6)


def test_a_prompt_keeps_the_real_tokens_in_place(monkeypatch):
    """With its soft tokens masked out, a prompt model is the base model exactly (positions,
    segments and the cut of the output are right); visible, they change the output."""
    base, base_params, tuned, params = base_and_peft("prompt", num_tokens=3)
    want = base.apply({"params": base_params}, **batch())["hidden"]
    visible = tuned.apply({"params": params}, **batch())["hidden"]
    assert visible.shape == want.shape and not np.allclose(visible, want, atol=1e-3)

    def masked_prompt(bias, count, pad_queries_of=0):
        widths = [(0, 0)] * (bias.ndim - 1) + [(count, 0)]
        return jnp.pad(bias, widths, constant_values=layers.MASKED)

    monkeypatch.setattr(prompts, "_pad_keys", masked_prompt)
    hidden = tuned.apply({"params": params}, **batch())["hidden"]
    np.testing.assert_allclose(hidden, want, rtol=0, atol=1e-6)


def test_prefix_keys_are_attended():
    base, base_params, tuned, params = base_and_peft("prefix", num_tokens=2)
    shapes = {n: v.shape for n, v in flax.traverse_util.flatten_dict(params, sep="/").items()}
    assert shapes["encoder/layers_0/attn/prefix_key"] == (2, 2, 16)
    want = base.apply({"params": base_params}, **batch())["hidden"]
    got = tuned.apply({"params": params}, **batch())["hidden"]
    assert not np.allclose(got, want, atol=1e-3)


@pytest.mark.parametrize("scan", [False, True])
def test_lora_merged_equals_unmerged(scan):
    settings = dict(rank=4, alpha=8.0, targets="attn/(query|key|value|out)|mlp/wi")
    _, _, tuned, params = base_and_peft("lora", scan=scan, **settings)
    flat = flax.traverse_util.flatten_dict(params)
    rng = np.random.default_rng(1)
    flat = {k: (jnp.asarray(rng.normal(0, 0.1, v.shape), v.dtype) if k[-1] == "lora_b" else v)
            for k, v in flat.items()}
    params = flax.traverse_util.unflatten_dict(flat)
    settings_peft = peft.Peft(method="lora", **settings)
    merged = lora.merge(params, settings_peft)
    assert not any("lora" in n for n in tree.names(merged))
    plain = build("full", scan)
    want = tuned.apply({"params": params}, **batch())["hidden"]
    got = plain.apply({"params": merged}, **batch())["hidden"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert not np.allclose(plain.apply({"params": tree.split(params, lambda n: "lora" not in n)[0]},
                                       **batch())["hidden"], want, atol=1e-4)
    lora_params, _ = tree.split(params, lambda n: "lora" in n)
    restored = lora.unmerge(merged, lora_params, settings_peft)
    for name, value in flax.traverse_util.flatten_dict(params).items():
        np.testing.assert_allclose(flax.traverse_util.flatten_dict(restored)[name], value, atol=1e-6)


def test_trainable_by_method_and_pattern():
    config = config_lib.default_config()
    config.init_from = "somewhere"
    names = ["encoder/layers_0/attn/query/kernel", "encoder/layers_0/attn/query/bias",
             "encoder/layers_0/attn/query/lora_a", "encoder/layers_0/adapter_mlp/up",
             "encoder/prompt", "encoder/layers_0/attn/prefix_key", "classifier/kernel", "embed/embedding"]
    expected = {
        "full": set(names),
        "lora": {"encoder/layers_0/attn/query/lora_a", "classifier/kernel"},
        "adapter": {"encoder/layers_0/adapter_mlp/up", "classifier/kernel"},
        "prompt": {"encoder/prompt", "classifier/kernel"},
        "prefix": {"encoder/layers_0/attn/prefix_key", "classifier/kernel"},
        "bitfit": {"encoder/layers_0/attn/query/bias", "classifier/kernel"},
        "head": {"classifier/kernel"},
    }
    for method, want in expected.items():
        config.peft.method = method
        trainable = peft.trainable_fn(config, (r"^classifier/",))
        assert {n for n in names if trainable(n)} == want, method
    config.peft.update(dict(method="full", frozen="embed"))
    assert not peft.trainable_fn(config, ())("embed/embedding")
    config.peft.update(dict(method="head", frozen="", trainable="attn/query/bias"))
    assert peft.trainable_fn(config, ())("encoder/layers_0/attn/query/bias")


def test_bad_settings_name_the_key():
    config = config_lib.default_config()
    config.peft.method = "qlora"
    with pytest.raises(ValueError, match="peft.method='qlora'"):
        peft.from_config(config)
    config.peft.method = "lora"
    with pytest.raises(ValueError, match="set init_from"):
        peft.from_config(config)
    config.init_from = "x"
    config.model.name = "gpt"
    config.peft.method = "prompt"
    with pytest.raises(ValueError, match="use peft.method='prefix'"):
        peft.from_config(config)


# --- PEFT runs through the trainer, from a tiny base run on SST-2 -----------------------------

@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tiny_finetune):
    workdir = str(tmp_path_factory.mktemp("base"))
    loop.train_and_evaluate(tiny_finetune(), workdir)
    return workdir


def saved_param_names(workdir):
    ckpt = checkpoint.Checkpointer(workdir, read_only=True)
    try:
        shapes = checkpoint._saved_shapes(ckpt.manager, ckpt.latest_step())
    finally:
        ckpt.close()
    return shapes


@pytest.mark.parametrize("method", ["lora", "adapter", "prompt", "prefix", "bitfit", "head"])
def test_a_peft_run_trains_and_saves_only_its_parameters(method, base_run, tiny_finetune, tmp_path):
    workdir = str(tmp_path / method)
    config = tiny_finetune("sst2.py", method, init_from=base_run)
    loop.train_and_evaluate(config, workdir)
    _, base_params, _ = loop.restore_latest(base_run)
    run, params, step = loop.restore_latest(workdir)
    assert step == 3
    base_flat = {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(jax.device_get(base_params)).items()}
    flat = {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(jax.device_get(params)).items()}
    report = json.load(open(os.path.join(workdir, "params.json")))
    trainable = {n for n in flat if run.task.trainable(n)}
    assert set(report["frozen"]) == set(flat) - trainable
    assert report["total"] == sum(v.size for v in flat.values())
    assert report["trainable"] == sum(flat[n].size for n in trainable) < report["total"] / 2
    assert report["loaded"] == sum(v.size for n, v in flat.items() if n in base_flat)
    assert set(report["new"]) == set(flat) - set(base_flat)
    for name in report["frozen"]:  # frozen: bit-identical to the base
        np.testing.assert_array_equal(flat[name], base_flat[name], err_msg=name)
    changed = [n for n in trainable if n not in base_flat or not np.array_equal(flat[n], base_flat[n])]
    assert len(changed) == len(trainable), sorted(trainable - set(changed))
    # The checkpoint holds the trainable parameters and their optimizer state, nothing else.
    saved = saved_param_names(workdir)
    saved_params = {k[len("params."):].replace(".", "/") for k in saved if k.startswith("params.")}
    assert saved_params == trainable
    moments = sum(np.prod(s) for k, s in saved.items() if k.startswith("opt_state") and len(s))
    assert moments == 2 * report["trainable"]  # Adam's mu and nu


@pytest.mark.slow  # three training runs
def test_a_peft_run_resumes_onto_its_base(base_run, tiny_finetune, tmp_path):
    """Stopped at step 3 and resumed to 5, a LoRA run equals an uninterrupted 5-step run."""
    config = tiny_finetune("sst2.py", "lora", init_from=base_run)
    config.optim.decay_steps = 5
    config.train.steps = 5
    straight = loop.train_and_evaluate(config, str(tmp_path / "straight"))
    workdir = str(tmp_path / "resumed")
    config.train.steps = 3
    loop.train_and_evaluate(config, workdir)
    config.train.steps = 5
    resumed = loop.train_and_evaluate(config, workdir)
    for a, b in zip(jax.tree.leaves(straight.model_params), jax.tree.leaves(resumed.model_params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def test_frozen_parameters_missing_from_the_base_are_an_error(base_run, tiny_finetune, tmp_path):
    config = tiny_finetune("sst2.py", "head", init_from=base_run)
    config.init_skip = "layers_1/"  # not taken from the base, and 'head' freezes it
    with pytest.raises(ValueError, match="layers_1.*freezes them"):
        loop.train_and_evaluate(config, str(tmp_path / "bad"))


def test_a_merged_lora_run_predicts_like_the_lora_run(base_run, tiny_finetune, tmp_path):
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    import merge_lora

    workdir = str(tmp_path / "lora")
    loop.train_and_evaluate(tiny_finetune("sst2.py", "lora", init_from=base_run), workdir)
    merged = str(tmp_path / "merged")
    assert merge_lora.merge_workdir(workdir, merged) == 3
    run, params, _ = loop.restore_latest(merged)
    assert run.config.peft.method == "full" and not any("lora" in n for n in tree.names(params))
    lora_run, lora_params, _ = loop.restore_latest(workdir)
    want, _ = lora_run.task.predictions(lora_params, "validation")
    got, _ = run.task.predictions(params, "validation")
    assert got == want


def test_the_auto_learning_rate_follows_a_method_set_on_the_command_line():
    """configs/sst2.py leaves optim.lr auto (-1): the method's usual rate, resolved after the
    overrides; an explicit rate wins; an invalid one is named."""
    import os
    from jaxlm import config as config_lib, peft
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "sst2.py")
    config = config_lib.from_file(path)
    config.peft.method = "lora"  # as --config.peft.method=lora does, after get_config()
    peft.resolve_learning_rate(config)
    assert config.optim.lr == peft.LEARNING_RATES["lora"] != peft.LEARNING_RATES["full"]
    config = config_lib.from_file(path, "lora")
    config.optim.lr = 5e-4
    peft.resolve_learning_rate(config)
    assert config.optim.lr == 5e-4
    config.optim.lr = -2.0
    with pytest.raises(ValueError, match=r"optim.lr=-2.0 must be -1 \(auto"):
        config_lib.validate(config)
