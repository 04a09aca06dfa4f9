"""CLIP (transformers' CLIPModel) imports into jaxlm's dual encoder: the unit image and text
embeddings and the logit scale match transformers, the text tower pools at the EOS as
transformers does, the tool makes an image_text workdir that loads and evaluates, and a config
jaxlm cannot represent is an error naming the key.

The checkpoint is a tiny random CLIP (hidden 32, 2 layers, 2 heads, 32x32 images in 8x8 patches,
vocabulary 99, projection 16) with every weight drawn where a wrong mapping shows (see
test_convert.py), and a word-level tokenizer.json whose BOS and EOS are CLIP's spellings.
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
hf_tokenizers = pytest.importorskip("tokenizers")

from test_convert import TOLERANCE, random_value, rewrite

from jaxlm import config as config_lib, convert, convert_hf, evaluate
from jaxlm.convert import compare
from jaxlm.models import dual_encoder
from jaxlm.train import loop

BOS, EOS, PAD = 49, 50, 1  # EOS not the largest id: pooling the largest id instead would show
WORDS = ("a the of and to in is it photo picture image small black white cat dog shoe bag red blue green "
         "square big quick brown fox jumps over lazy").split()


def clip_config(**text):
    return transformers.CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=BOS, eos_token_id=EOS,
                         pad_token_id=PAD, **text),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)


def save_clip(path: Path, config, seed: int = 0) -> str:
    """A CLIPModel with random weights (logit_scale too) and a tokenizer, saved to `path`."""
    torch.manual_seed(seed)
    model = transformers.CLIPModel(config)
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.from_numpy(np.asarray(random_value(name, tuple(p.shape), rng))))
    model.save_pretrained(path)
    words = [*WORDS, *(f"word{i}" for i in range(BOS - 2 - len(WORDS)))]
    vocab = {"<unk>": 0, "<|padding|>": PAD, **{word: i + 2 for i, word in enumerate(words)},
             "<|startoftext|>": BOS, "<|endoftext|>": EOS}
    save_word_tokenizer(path, vocab, bos_token="<|startoftext|>", eos_token="<|endoftext|>")
    return str(path)


def save_word_tokenizer(path: Path, vocab: dict, **settings) -> None:
    """A lower-casing word-level tokenizer.json of `vocab` ({word: id}, with <unk>) and its
    tokenizer_config.json `settings` (the special tokens) into `path`."""
    tokenizer = hf_tokenizers.Tokenizer(hf_tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = hf_tokenizers.normalizers.Lowercase()
    tokenizer.pre_tokenizer = hf_tokenizers.pre_tokenizers.Whitespace()
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(settings))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A CLIP with its image processor (CLIP's pixel mean and std: the import's pixel_mean/std)."""
    hf_dir = save_clip(tmp_path_factory.mktemp("clip"), clip_config())
    transformers.CLIPImageProcessor().save_pretrained(hf_dir)
    return hf_dir


def run_config(hf_dir: str, scan_layers: bool = True):
    config = config_lib.default_config()
    for section, values in convert.config_overrides(hf_dir).items():
        config[section].update(values)
    config.model.scan_layers = config.image_model.scan_layers = scan_layers
    return config


def imported(hf_dir: str, scan_layers: bool = True):
    config = run_config(hf_dir, scan_layers)
    return config, compare.fill_missing(hf_dir, config, convert.import_run_params(hf_dir, config))


@pytest.mark.parametrize("scan_layers", [True, False])
def test_import_matches_transformers_embeddings_and_scale(clip_dir, scan_layers):
    config, params = imported(clip_dir, scan_layers)
    assert (config.task.name, config.model.name, config.model.text_pool, config.model.eos_id) == (
        "image_text", "gpt", "eos", EOS)
    assert config.image_model.pre_norm and config.model.mlp == config.image_model.mlp == "quick_gelu"
    processor = transformers.CLIPImageProcessor.from_pretrained(clip_dir)
    assert config.image_model.pixel_mean == tuple(processor.image_mean) and not config.model.pixel_mean
    batch = compare.make_batch(clip_dir, n=6, tokenizer=None)
    assert (batch["attention_mask"] == 0).any()  # padded rows: their EOS is not the last position
    diffs = compare.side_by_side(clip_dir, config, params, batch)
    assert sorted(diffs) == ["image_embeds", "logit_scale", "logits_per_image", "text_embeds"]
    assert max(d.max() for d in diffs.values()) <= TOLERANCE, diffs


def hf_text_embeds(hf_dir: str, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    model = compare.load_hf_model(hf_dir, heads=True)
    with torch.no_grad():
        features = model.get_text_features(input_ids=torch.from_numpy(ids).long(),
                                           attention_mask=torch.from_numpy(mask).long())
    features = getattr(features, "pooler_output", features)  # transformers 5: an output with the projection
    return torch.nn.functional.normalize(features, dim=-1).numpy()


def jaxlm_text_embeds(config, params, ids, mask, text_pool: str | None = None) -> np.ndarray:
    text = config.model.copy_and_resolve_references()
    text.text_pool = text_pool or text.text_pool
    model = dual_encoder.from_config(text, config.image_model, config.task.projection_dim)
    model_params = {k: v for k, v in params.items() if k != "log_scale"}
    encode = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m, method=dual_encoder.DualEncoder.encode_text))
    return np.asarray(encode(model_params, ids, mask))


# Rows whose EOS is followed by more real tokens, by padding, or is missing (transformers then
# pools position 0); the largest id of a row is not at its EOS.
IDS = np.array([[BOS, 5, 6, EOS, 7, 8, 90, 9],
                [BOS, 91, EOS, PAD, PAD, PAD, PAD, PAD],
                [BOS, 3, 4, 5, 6, 7, 8, EOS],
                [BOS, 3, 95, 4, 5, 6, 7, 8]], np.int32)
MASK = np.array([[1] * 8, [1] * 3 + [0] * 5, [1] * 8, [1] * 8], np.int32)


def test_text_tower_pools_the_first_eos_as_transformers_does(clip_dir):
    config, params = imported(clip_dir)
    theirs = hf_text_embeds(clip_dir, IDS, MASK)
    assert np.abs(jaxlm_text_embeds(config, params, IDS, MASK) - theirs).max() <= TOLERANCE
    # Pooling elsewhere (the largest id, or the mean of the real tokens) is far off on these rows.
    for wrong in ("max_id", "mean"):
        far = np.abs(jaxlm_text_embeds(config, params, IDS, MASK, wrong) - theirs).max(-1)
        assert (far[[0, 1, 3]] > 1e-2).all(), (wrong, far)


def test_configs_older_than_the_eos_fix_pool_the_largest_id(clip_dir, tmp_path):
    """eos_token_id 2 (CLIP configs from before transformers' PR #24773): the largest id."""
    def legacy(settings):
        settings["text_config"]["eos_token_id"] = 2
    hf_dir = rewrite(clip_dir, tmp_path / "legacy", config=legacy)
    config, params = imported(hf_dir)
    assert (config.model.text_pool, config.model.eos_id) == ("max_id", 2)
    theirs = hf_text_embeds(hf_dir, IDS, MASK)
    assert np.abs(jaxlm_text_embeds(config, params, IDS, MASK) - theirs).max() <= TOLERANCE


def write_captions(folder: Path, rng) -> list[tuple[np.ndarray, str]]:
    from PIL import Image
    folder.mkdir(parents=True)
    pairs = [(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), caption)
             for caption in ("a red square", "a small black cat", "the quick brown fox", "a blue bag")]
    for i, (pixels, _) in enumerate(pairs):
        Image.fromarray(pixels).save(folder / f"{i}.png")
    (folder / "captions.jsonl").write_text("".join(json.dumps({"image": f"{i}.png", "captions": [caption]}) + "\n"
                                                   for i, (_, caption) in enumerate(pairs)))
    return pairs


def test_the_image_text_task_embeds_captions_and_pixels_as_transformers(clip_dir, tmp_path):
    """The task of the imported run: rows BOS text EOS (padded) from the checkpoint's tokenizer,
    images as pixels / 255 (the model normalizes them as CLIP's image processor does)."""
    config, params = imported(clip_dir)
    config.data.update(convert.data_overrides(clip_dir))
    folder = str(tmp_path / "captions")
    config.data.update(dict(name="jaxlm_image_captions", files=f"train={folder},validation={folder}"))
    config.train.batch_size = 8
    pairs = write_captions(tmp_path / "captions", np.random.default_rng(0))
    task = loop.setup(config, str(tmp_path / "run")).task
    captions = [caption for _, caption in pairs]
    rows = [task.encode_text(caption) for caption in captions]
    ids, mask = (np.stack([row[key] for row in rows]) for key in ("input_ids", "input_mask"))
    assert ids[0, 0] == BOS and ids[0, mask[0].sum() - 1] == EOS and mask[0].sum() < len(mask[0])
    pixels = np.stack([image for image, _ in pairs])
    model = compare.load_hf_model(clip_dir, heads=True)
    processor = transformers.CLIPImageProcessor.from_pretrained(clip_dir)
    pixel_values = processor(images=list(pixels), do_resize=False, do_center_crop=False, return_tensors="pt").pixel_values
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                    pixel_values=pixel_values)
    assert np.abs(task.embed_texts(params, captions) - out.text_embeds.numpy()).max() <= TOLERANCE
    assert np.abs(task.embed_images(params, pixels) - out.image_embeds.numpy()).max() <= TOLERANCE


def name_captions(workdir: str, folder: Path) -> None:
    """Captioned images written to `folder`, named in the workdir's config.json (batches of 8)."""
    write_captions(folder, np.random.default_rng(0))
    settings = json.loads(Path(workdir, "config.json").read_text())
    settings["data"]["files"] = f"train={folder},validation={folder}"
    settings["train"]["batch_size"] = 8
    Path(workdir, "config.json").write_text(json.dumps(settings))


def test_tool_imports_an_image_text_workdir_that_loads_and_evaluates(clip_dir, tmp_path):
    """`tools/convert_hf.py import` without --config, then `python -m jaxlm.evaluate --workdir`
    once the workdir's config.json names caption folders."""
    workdir = str(tmp_path / "workdir")
    assert convert_hf.main(["import", f"--hf_dir={clip_dir}", f"--workdir={workdir}"]) == 0
    saved = config_lib.load(workdir)
    assert (saved.task.name, saved.task.projection_dim, saved.model.name, saved.data.name, saved.data.seq_len) == (
        "image_text", 16, "gpt", "jaxlm_image_captions", 16)
    name_captions(workdir, tmp_path / "captions")
    metrics = evaluate.evaluate(workdir)
    assert metrics["step"] == 0 and 0 <= metrics["eval/i2t_r1"] <= 1 and metrics["eval/i2t_r5"] == 1.0, metrics
    run, params, _ = loop.restore_latest(workdir)
    ours = convert.import_run_params(clip_dir, run.config)
    np.testing.assert_array_equal(params["log_scale"], ours["log_scale"])
    np.testing.assert_array_equal(params["text"]["decoder"]["layers"]["mlp"]["wi"]["kernel"],
                                  ours["text"]["decoder"]["layers"]["mlp"]["wi"]["kernel"])
    assert not params["image"]["patch_embed"]["bias"].any()  # CLIP has none: jaxlm's stays zero


def check_prints_the_parity_figure(hf_dir: str, capsys, outputs) -> None:
    """`tools/convert_hf.py check` on 4 examples: a line each naming `outputs`, then the figure."""
    assert convert_hf.main(["check", f"--hf_dir={hf_dir}", "--examples=4"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 5 and all(f"{key}=" in out[0] for key in outputs), out
    assert out[-1].startswith("max_abs_diff=") and float(out[-1].split("=")[1]) <= TOLERANCE, out


def test_tool_check_prints_the_parity_figure(clip_dir, capsys):
    check_prints_the_parity_figure(clip_dir, capsys, ("image_embeds", "text_embeds"))


@pytest.mark.parametrize("section, key, value, message", [
    ("text_config", "hidden_act", "relu6", r"clip_text_model option text_config\.hidden_act='relu6' is not supported"),
    ("vision_config", "image_size", [32, 24], r"CLIP vision_config image_size=\[32, 24\]: .* square images"),
    ("text_config", "eos_token_id", [EOS, 3], r"CLIP text_config eos_token_id=\[50, 3\]: jaxlm pools at one EOS id"),
])
def test_a_config_jaxlm_cannot_represent_is_an_error_naming_the_key(clip_dir, tmp_path, section, key, value, message):
    config_is_an_error(clip_dir, tmp_path, section, key, value, message)


def config_is_an_error(hf_dir: str, tmp_path, section: str, key: str, value, message: str) -> None:
    """The checkpoint with config.json's `section`.`key` set to `value` fails with `message`."""
    bad = rewrite(hf_dir, tmp_path / "bad", config=lambda settings: settings[section].update({key: value}))
    with pytest.raises(ValueError, match=message):
        convert.config_overrides(bad)


def test_unknown_and_missing_tensors_and_single_model_calls_are_named(clip_dir, tmp_path):
    def extra(tensors):
        tensors["text_model.encoder.layers.0.extra.weight"] = np.zeros(3, np.float32)
    config = run_config(clip_dir)
    hf_dir = rewrite(clip_dir, tmp_path / "extra", tensors=extra)
    with pytest.raises(ValueError, match=r"no place for tensors \['text_model.encoder.layers.0.extra.weight'\]"):
        convert.import_run_params(hf_dir, config)
    hf_dir = rewrite(clip_dir, tmp_path / "missing", tensors=lambda tensors: tensors.pop("vision_model.pre_layrnorm.weight"))
    with pytest.raises(ValueError, match=r"lacks jaxlm vit parameters: pre_norm/scale \(Hugging Face "
                                         r"vision_model.pre_layrnorm.weight\)"):
        convert.import_run_params(hf_dir, config)
    with pytest.raises(ValueError, match="holds a clip dual encoder"):
        convert.model_overrides(clip_dir)
    config.task.projection_dim = 8
    with pytest.raises(ValueError, match=r"task.projection_dim=8 \(the checkpoint has 16\)"):
        convert.import_run_params(clip_dir, config)
