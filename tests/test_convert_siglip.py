"""SigLIP (transformers' SiglipModel) imports into jaxlm's dual encoder: the unit image and text
embeddings, the logit scale and bias and the pair logits match transformers, the text tower attends
over the whole padded row and pools its last position, the tool makes an image_text workdir with
the siglip loss that loads and evaluates, and a config jaxlm cannot represent is an error naming
the key.

The checkpoint is a tiny random SigLIP (hidden 32, 2 layers, 2 heads, 32x32 images in 8x8 patches
with the attention-pooling head, vocabulary 99, 16 positions) with every weight drawn where a
wrong mapping shows (see test_convert.py), a logit scale past CLIP's clamp of 100 and a logit bias
as trained SigLIPs have, and a word-level tokenizer.json whose EOS and padding are SigLIP's `</s>`.
"""

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers reads it

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from test_convert import TOLERANCE, rewrite, save_hf
from test_convert_clip import (WORDS, check_prints_the_parity_figure, config_is_an_error, imported, name_captions,
                               run_config, save_word_tokenizer, write_captions)

from jaxlm import config as config_lib, convert, convert_hf, evaluate
from jaxlm.convert import compare
from jaxlm.models import dual_encoder, layers
from jaxlm.train import loop

PAD, EOS = 0, 1  # SigLIP's sentencepiece: <pad> 0, </s> 1 (its tokenizer pads with </s>)
SEQ_LEN = 16
LOGIT_SCALE, LOGIT_BIAS = 4.76, -12.9  # exp(4.76) = 117: past CLIP's clamp of 100


def siglip_config():
    return transformers.SiglipConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=SEQ_LEN, pad_token_id=EOS,
                         eos_token_id=EOS),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8))


def set_scale_and_bias(tensors):
    tensors["logit_scale"] = np.full(1, LOGIT_SCALE, np.float32)
    tensors["logit_bias"] = np.full(1, LOGIT_BIAS, np.float32)


def save_siglip(path: Path, config, seed: int = 0) -> str:
    """A SiglipModel with random weights (the attention pooling's probe too), SigLIP's scale and
    bias, and a tokenizer."""
    save_hf(path, transformers.SiglipModel, config, edits=dict(tensors=set_scale_and_bias), seed=seed)
    words = [*WORDS, *(f"word{i}" for i in range(96 - len(WORDS)))]
    vocab = {"<pad>": PAD, "</s>": EOS, "<unk>": 2, **{word: i + 3 for i, word in enumerate(words)}}
    save_word_tokenizer(path, vocab, eos_token="</s>", pad_token="</s>")
    return str(path)


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    return save_siglip(tmp_path_factory.mktemp("siglip"), siglip_config())


@pytest.mark.parametrize("scan_layers", [True, False])
def test_import_matches_transformers_embeddings_scale_bias_and_logits(siglip_dir, scan_layers):
    config, params = imported(siglip_dir, scan_layers)
    t, m, i = config.task, config.model, config.image_model
    assert (t.name, t.contrastive_loss, t.projection_dim, t.projection_bias, t.image_projection) == (
        "image_text", "siglip", 32, True, False)
    assert (m.name, m.causal, m.text_pool, i.name, i.pool, i.pre_norm, config.data.seq_len) == (
        "gpt", False, "last", "vit", "map", False, SEQ_LEN)
    assert m.mlp == i.mlp == "gelu"  # gelu_pytorch_tanh: the tanh approximation
    assert "image_projection" not in params and params["text_projection"]["bias"].shape == (32,)
    assert params["image"]["patch_embed"]["bias"].any() and "cls" not in params["image"]
    np.testing.assert_allclose([params["log_scale"], params["logit_bias"]], [LOGIT_SCALE, LOGIT_BIAS], rtol=1e-6)
    batch = compare.make_batch(siglip_dir, n=6, tokenizer=None)
    assert batch["input_ids"].shape == (6, SEQ_LEN) and (batch["input_ids"][:, -1] == EOS).sum() >= 3  # padded
    diffs = compare.side_by_side(siglip_dir, config, params, batch)
    assert sorted(diffs) == ["image_embeds", "logit_bias", "logit_scale", "logits_per_image", "text_embeds"]
    print("SigLIP parity, max |jaxlm - transformers|:", {k: f"{v.max():.2e}" for k, v in diffs.items()})
    assert max(d.max() for d in diffs.values()) <= TOLERANCE, diffs


def hf_outputs(hf_dir: str, ids: np.ndarray, pixels: np.ndarray, attention_mask=None):
    model = compare.load_hf_model(hf_dir, heads=True)
    mask = None if attention_mask is None else torch.from_numpy(attention_mask).long()
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids).long(), pixel_values=torch.from_numpy(pixels),
                     attention_mask=mask)


def jaxlm_text_embeds(config, params, ids, **model_values) -> np.ndarray:
    text = config.model.copy_and_resolve_references()
    text.update(model_values)
    model = dual_encoder.from_run_config(config, text=text)
    model_params = {k: v for k, v in params.items() if k not in ("log_scale", "logit_bias")}
    encode = jax.jit(lambda p, i: model.apply({"params": p}, i, jax.numpy.ones_like(i),
                                              method=dual_encoder.DualEncoder.encode_text))
    return np.asarray(encode(model_params, ids))


def test_the_text_tower_is_bidirectional_over_the_padded_row_and_pools_its_last_position(siglip_dir):
    """Pooling elsewhere or attending causally is far off: the parity above tells them apart."""
    config, params = imported(siglip_dir)
    batch = compare.make_batch(siglip_dir, n=4, tokenizer=None)
    theirs = hf_outputs(siglip_dir, batch["input_ids"], batch["pixel_values"]).text_embeds.numpy()
    assert np.abs(jaxlm_text_embeds(config, params, batch["input_ids"]) - theirs).max() <= TOLERANCE
    for wrong in (dict(text_pool="mean"), dict(causal=True)):
        far = np.abs(jaxlm_text_embeds(config, params, batch["input_ids"], **wrong) - theirs).max()
        assert far > 10 * TOLERANCE, (wrong, far)
    # transformers given an attention mask hides the padding from the pooled last position: not
    # how SigLIP was trained, nor what jaxlm computes
    real = (batch["input_ids"] != EOS).astype(np.int32)
    real[:, 0] = 1
    masked = hf_outputs(siglip_dir, batch["input_ids"], batch["pixel_values"], real).text_embeds.numpy()
    assert np.abs(masked - theirs).max() > 10 * TOLERANCE


def test_the_image_text_task_embeds_scores_and_losses_as_transformers(siglip_dir, tmp_path):
    """The task of the imported run: its text rows (text EOS, padded with EOS to the full length,
    never cut shorter), unit embeddings and pair logits match transformers, and its siglip loss is
    SigLIP's of transformers' logits (the scale unclamped)."""
    config, params = imported(siglip_dir)
    config.data.update(convert.data_overrides(siglip_dir))
    folder = str(tmp_path / "captions")
    config.data.update(dict(name="jaxlm_image_captions", files=f"train={folder},validation={folder}", pad_multiple=4))
    config.train.batch_size = 8
    pairs = write_captions(tmp_path / "captions", np.random.default_rng(0))
    task = loop.setup(config, str(tmp_path / "run")).task
    captions = [caption for _, caption in pairs]
    vocab = json.loads(Path(siglip_dir, "tokenizer.json").read_text())["model"]["vocab"]
    ids = np.full((len(captions), SEQ_LEN), EOS, np.int32)  # SigLIP's rows, built here on their own
    for row, caption in zip(ids, captions):
        words = [vocab[w] for w in caption.lower().split()]
        row[:len(words)] = words
    np.testing.assert_array_equal(np.stack([task.encode_text(c)["input_ids"] for c in captions]), ids)
    pixels = np.stack([image for image, _ in pairs])
    out = hf_outputs(siglip_dir, ids, pixels.transpose(0, 3, 1, 2).astype(np.float32) / 255)
    texts, images = task.embed_texts(params, captions), task.embed_images(params, pixels)
    logits = dual_encoder.pair_logits(images, texts, dual_encoder.logit_scale(params["log_scale"], clamp=False),
                                      params["logit_bias"])
    figures = {"text_embeds": np.abs(texts - out.text_embeds.numpy()).max(),
               "image_embeds": np.abs(images - out.image_embeds.numpy()).max(),
               "logits_per_image": np.abs(np.asarray(logits) - out.logits_per_image.numpy()).max()}
    print("SigLIP task parity:", {k: f"{v:.2e}" for k, v in figures.items()})
    assert max(figures.values()) <= TOLERANCE, figures
    mask = (ids != EOS).astype(np.int32)
    batch = {"image": pixels.astype(np.float32) / 255, "input_ids": ids, "input_mask": mask,
             "label": np.full(len(ids), -1, np.int32)}
    z = 2 * np.eye(len(ids)) - 1
    want = -torch.nn.functional.logsigmoid(torch.from_numpy(z) * out.logits_per_image.double()).sum()
    np.testing.assert_allclose(task.loss(params, batch)[0], want.item(), rtol=1e-5)
    # The last position of the whole row is the pooled one: rows are not cut to their longest.
    assert task.fit_length({"input_ids": ids[None], "input_mask": mask[None]})["input_ids"].shape[-1] == SEQ_LEN


@pytest.mark.slow
def test_tool_imports_a_siglip_workdir_that_loads_and_evaluates(siglip_dir, tmp_path):
    """`tools/convert_hf.py import` without --config: an image_text workdir with the siglip loss
    and the checkpoint's scale and bias; `jaxlm.evaluate` runs it once its config.json names
    caption folders."""
    workdir = str(tmp_path / "workdir")
    assert convert_hf.main(["import", f"--hf_dir={siglip_dir}", f"--workdir={workdir}"]) == 0
    saved = config_lib.load(workdir)
    assert (saved.task.name, saved.task.contrastive_loss, saved.model.text_pool, saved.image_model.pool,
            saved.data.name, saved.data.seq_len) == ("image_text", "siglip", "last", "map", "jaxlm_image_captions",
                                                     SEQ_LEN)
    name_captions(workdir, tmp_path / "captions")
    metrics = evaluate.evaluate(workdir)
    assert metrics["step"] == 0 and np.isfinite(metrics["eval/loss"]) and metrics["eval/i2t_r5"] == 1.0, metrics
    _, params, _ = loop.restore_latest(workdir)
    np.testing.assert_allclose([params["log_scale"], params["logit_bias"]], [LOGIT_SCALE, LOGIT_BIAS], rtol=1e-6)
    ours = convert.import_run_params(siglip_dir, saved)
    np.testing.assert_array_equal(params["image"]["map"]["attn"]["key"]["kernel"],
                                  ours["image"]["map"]["attn"]["key"]["kernel"])
    np.testing.assert_array_equal(params["text_projection"]["bias"], ours["text_projection"]["bias"])


def test_the_activation_that_runs_is_the_tanh_gelu(siglip_dir):
    """gelu_pytorch_tanh and the exact GELU differ by < 1e-3 (too little to show in the unit
    embeddings): the MLP activation jaxlm runs for it is compared on its own, in float32."""
    config = run_config(siglip_dir)
    x = np.linspace(-6, 6, 1201, dtype=np.float32)
    ours = np.asarray(layers.ACTIVATIONS[config.model.mlp][0](x))
    act = transformers.activations.ACT2FN
    tanh, exact = (act[name](torch.from_numpy(x)).numpy() for name in ("gelu_pytorch_tanh", "gelu"))
    assert config.image_model.mlp == config.model.mlp and not layers.ACTIVATIONS[config.model.mlp][1]
    assert np.abs(ours - tanh).max() <= 1e-6 < 1e-4 < np.abs(ours - exact).max()


def test_the_logit_scale_is_clamped_for_clip_only():
    np.testing.assert_allclose(dual_encoder.logit_scale(LOGIT_SCALE, clamp=False), np.exp(LOGIT_SCALE), rtol=1e-6)
    assert dual_encoder.logit_scale(LOGIT_SCALE) == dual_encoder.MAX_SCALE


def test_tool_check_prints_the_parity_figure(siglip_dir, capsys):
    check_prints_the_parity_figure(siglip_dir, capsys, ("image_embeds", "text_embeds", "logits_per_image",
                                                        "logit_bias"))


@pytest.mark.parametrize("section, key, value, message", [
    ("vision_config", "vision_use_head", False,
     r"siglip_vision_model option vision_config\.vision_use_head=False is not supported by jaxlm \(only True\)"),
    ("text_config", "hidden_act", "relu6", r"siglip_text_model option text_config\.hidden_act='relu6' is not supported"),
    ("vision_config", "image_size", [32, 24], r"SigLIP vision_config image_size=\[32, 24\]: .* square images"),
    ("text_config", "projection_size", 16, r"SigLIP text_config projection_size=16 differs from vision_config "
                                           r"hidden_size=32"),
])
def test_a_config_jaxlm_cannot_represent_is_an_error_naming_the_key(siglip_dir, tmp_path, section, key, value, message):
    config_is_an_error(siglip_dir, tmp_path, section, key, value, message)


def test_unknown_and_missing_tensors_are_named(siglip_dir, tmp_path):
    config = run_config(siglip_dir)
    hf_dir = rewrite(siglip_dir, tmp_path / "missing", tensors=lambda tensors: tensors.pop("vision_model.head.probe"))
    with pytest.raises(ValueError, match=r"lacks jaxlm vit parameters: map/probe \(Hugging Face "
                                         r"vision_model.head.probe\)"):
        convert.import_run_params(hf_dir, config)
    hf_dir = rewrite(siglip_dir, tmp_path / "headless", tensors=lambda tensors: tensors.pop("text_model.head.bias"))
    with pytest.raises(ValueError, match=r"lacks jaxlm siglip parameters: text_projection/bias"):
        convert.import_run_params(hf_dir, config)
    with pytest.raises(ValueError, match="holds a siglip dual encoder"):
        convert.model_overrides(siglip_dir)


def test_image_projection_off_needs_the_image_width_as_projection_dim(siglip_dir):
    config = run_config(siglip_dir)
    config.task.projection_dim = 16
    with pytest.raises(ValueError, match=r"task.projection_dim=16 must be image_model.emb_dim=32"):
        dual_encoder.from_run_config(config)
