"""Tests for jaxlm.data.images: IDX builders (MNIST, Fashion-MNIST) and image batches."""

import gzip
import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from jaxlm.data import builders, images, readers

MNIST = images.MNIST
FASHION = images.FASHION_MNIST
SUBDIRS = {MNIST: "mnist", FASHION: "fashion_mnist"}
MNIST_TRAIN_LABEL_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
# Uncompressed-file md5s from $JAXLM_DATA_DIR/mnist/README.md.
MNIST_MD5 = {
    ("train", "image"): "6bbc9ace898e44ae57da46a324031adb",
    ("train", "label"): "a25bea736e30d166cdddb491f175f624",
    ("test", "image"): "2646ac647ad5339dbf082846283269ea",
    ("test", "label"): "27ae3e4e09519cfbb04c329615203637",
}


def raw_dir(name: str) -> Path:
    directory = builders.jaxlm_data_dir() / SUBDIRS[name]
    if not directory.is_dir():
        pytest.skip(f"{directory} is missing")
    return directory


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    """One prepared-data directory for the module: each data set is prepared once."""
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def mnist_train(data_dir) -> tuple[np.ndarray, np.ndarray]:
    raw_dir(MNIST)
    return images.get_images(MNIST, "train", data_dir=data_dir)


def idx_bytes(magic: int, array: np.ndarray) -> bytes:
    return struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + array.tobytes()


def write_gz(path: Path, data: bytes) -> Path:
    path.write_bytes(gzip.compress(data))
    return path


def expected_shift(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """`image` [H, W, C] moved down by dy and right by dx pixels, zeros filling in."""
    out = np.zeros_like(image)
    h, w = image.shape[:2]
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = image[
        max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
    ]
    return out


def take(ds, steps) -> list[dict[str, np.ndarray]]:
    return [ds[i] for i in steps]


def assert_batches_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for key, value in a.items():
        np.testing.assert_array_equal(value, b[key], err_msg=key)


# Builders and raw data.


@pytest.mark.parametrize("name", [MNIST, FASHION])
def test_split_sizes_shapes_and_features(name, data_dir):
    raw_dir(name)
    for split, count in [("train", 60_000), ("test", 10_000)]:
        x, y = images.get_images(name, split, data_dir=data_dir)
        assert x.shape == (count, 28, 28, 1) and x.dtype == np.uint8
        assert y.shape == (count,) and y.dtype == np.int32
        assert 0 <= y.min() and y.max() == 9
        assert x.min() == 0 and x.max() == 255
    assert images.num_classes(name, data_dir=data_dir) == 10
    assert images.image_shape(name, data_dir=data_dir) == (28, 28, 1)
    assert (Path(data_dir) / name / "1.0.0").is_dir()


def test_get_images_is_cached_and_read_only(mnist_train, data_dir):
    x, y = mnist_train
    again = images.get_images(MNIST, "train", data_dir=data_dir)
    assert again[0] is x and again[1] is y
    with pytest.raises(ValueError):
        x[0, 0, 0, 0] = 1


def test_mnist_train_label_histogram_is_canonical(mnist_train):
    _, y = mnist_train
    assert np.bincount(y, minlength=10).tolist() == MNIST_TRAIN_LABEL_COUNTS


@pytest.mark.parametrize("split", ["train", "test"])
def test_mnist_decoded_bytes_match_readme_md5(split, data_dir):
    raw_dir(MNIST)
    x, y = images.get_images(MNIST, split, data_dir=data_dir)
    decoded = {
        "image": idx_bytes(readers.IMAGES_MAGIC, x[..., 0]),
        "label": idx_bytes(readers.LABELS_MAGIC, y.astype(np.uint8)),
    }
    for feature, data in decoded.items():
        assert hashlib.md5(data).hexdigest() == MNIST_MD5[(split, feature)], feature


def test_fashion_mnist_matches_direct_parse(data_dir):
    directory = raw_dir(FASHION)
    x, y = images.get_images(FASHION, "test", data_dir=data_dir)
    with gzip.open(directory / "t10k-images-idx3-ubyte.gz", "rb") as f:
        raw_images = np.frombuffer(f.read(), np.uint8, offset=16)
    with gzip.open(directory / "t10k-labels-idx1-ubyte.gz", "rb") as f:
        raw_labels = np.frombuffer(f.read(), np.uint8, offset=8)
    np.testing.assert_array_equal(x.reshape(-1), raw_images)
    np.testing.assert_array_equal(y, raw_labels)
    assert np.bincount(y).tolist() == [1000] * 10


def test_read_idx_rejects_bad_files(tmp_path):
    labels = np.arange(10, dtype=np.uint8)
    good = write_gz(tmp_path / "good-labels-idx1-ubyte.gz", idx_bytes(readers.LABELS_MAGIC, labels))
    np.testing.assert_array_equal(readers.read_idx(good, readers.LABELS_MAGIC), labels)
    bad_magic = write_gz(tmp_path / "magic.gz", idx_bytes(1234, labels))
    with pytest.raises(ValueError, match="magic.gz.*magic number 2049: found 1234"):
        readers.read_idx(bad_magic, readers.LABELS_MAGIC)
    with pytest.raises(ValueError, match="good-labels.*2051"):  # Labels are not images.
        readers.read_idx(good, readers.IMAGES_MAGIC)
    short = write_gz(tmp_path / "short.gz", idx_bytes(readers.LABELS_MAGIC, labels)[:-1])
    with pytest.raises(ValueError, match=r"short.gz.*shape \(10,\) \(10 bytes\) but 9"):
        readers.read_idx(short, readers.LABELS_MAGIC)
    not_gzip = tmp_path / "plain.gz"
    not_gzip.write_bytes(idx_bytes(readers.LABELS_MAGIC, labels))
    with pytest.raises(ValueError, match="plain.gz.*gzip"):
        readers.read_idx(not_gzip, readers.LABELS_MAGIC)


def test_builder_names_the_corrupt_file(tmp_path):
    idx = tmp_path / "idx"
    idx.mkdir()
    rng = np.random.default_rng(0)
    for prefix, count in [("train", 6), ("t10k", 4)]:
        pixels = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        write_gz(idx / f"{prefix}-images-idx3-ubyte.gz", idx_bytes(readers.IMAGES_MAGIC, pixels))
        labels = np.arange(count, dtype=np.uint8)
        write_gz(idx / f"{prefix}-labels-idx1-ubyte.gz", idx_bytes(readers.LABELS_MAGIC, labels))
    write_gz(idx / "t10k-images-idx3-ubyte.gz", idx_bytes(2049, np.zeros((4, 28, 28), np.uint8)))
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz.*found 2049"):
        images.get_builder(MNIST, data_dir=str(tmp_path / "tfds"), input_dir=str(idx))


def test_builder_rejects_mismatched_counts(tmp_path):
    idx = tmp_path / "idx"
    idx.mkdir()
    write_gz(
        idx / "train-images-idx3-ubyte.gz",
        idx_bytes(readers.IMAGES_MAGIC, np.zeros((3, 28, 28), np.uint8)),
    )
    write_gz(
        idx / "train-labels-idx1-ubyte.gz",
        idx_bytes(readers.LABELS_MAGIC, np.zeros(2, np.uint8)),
    )
    with pytest.raises(ValueError, match="holds 3 images but .*train-labels.* 2 labels"):
        images.get_builder(FASHION, data_dir=str(tmp_path / "tfds"), input_dir=str(idx))


# Evaluation batches.


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_cover_every_example_once(process_count, data_dir):
    raw_dir(MNIST)
    x, y = images.get_images(MNIST, "test", data_dir=data_dir)
    per_process = [
        images.eval_batches(
            name=MNIST,
            split="test",
            global_batch_size=128,
            data_dir=data_dir,
            process_index=p,
            process_count=process_count,
        )
        for p in range(process_count)
    ]
    assert all(len(batches) == 79 for batches in per_process)  # ceil(10,000 / 128)
    global_batches = [
        {k: np.concatenate([batches[j][k] for batches in per_process]) for k in batches[0]}
        for j, batches in enumerate(zip(*per_process))
    ]
    for batch in global_batches:
        assert batch["image"].shape == (128, 28, 28, 1) and batch["image"].dtype == np.float32
        assert batch["label"].dtype == np.int32 and batch["weight"].dtype == np.float32
    image = np.concatenate([b["image"] for b in global_batches])
    label = np.concatenate([b["label"] for b in global_batches])
    weight = np.concatenate([b["weight"] for b in global_batches])
    assert weight.tolist() == [1.0] * 10_000 + [0.0] * (79 * 128 - 10_000)
    np.testing.assert_array_equal(image[:10_000], x.astype(np.float32) / 255)
    np.testing.assert_array_equal(label[:10_000], y)
    assert not image[10_000:].any() and not label[10_000:].any()
    assert image.min() == 0.0 and image.max() == 1.0


def test_eval_batches_max_batches(data_dir):
    raw_dir(MNIST)
    batches = images.eval_batches(
        name=MNIST, split="test", global_batch_size=100, max_batches=3, data_dir=data_dir
    )
    assert len(batches) == 3 and all(b["weight"].all() for b in batches)
    _, y = images.get_images(MNIST, "test", data_dir=data_dir)
    np.testing.assert_array_equal(batches[2]["label"], y[200:300])


# Training batches.


def synthetic(count: int) -> tuple[np.ndarray, np.ndarray]:
    """Images whose first pixel and label are the example index (mod 256 for the pixel)."""
    x = np.zeros((count, 4, 4, 1), np.uint8)
    x[:, 0, 0, 0] = np.arange(count) % 256
    return x, np.arange(count, dtype=np.int32)


def test_train_epochs_are_new_permutations():
    x, y = synthetic(300)
    ds = images.train_dataset(x, y, global_batch_size=100, seed=3)
    stream = np.concatenate([b["label"] for b in take(ds, range(9))])
    epochs = stream.reshape(3, 300)
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(300))
    assert (epochs[0] != epochs[1]).any() and (epochs[1] != epochs[2]).any()
    again = images.train_dataset(x, y, global_batch_size=100, seed=3)
    other = images.train_dataset(x, y, global_batch_size=100, seed=4)
    np.testing.assert_array_equal(again[4]["label"], ds[4]["label"])
    assert (other[0]["label"] != ds[0]["label"]).any()
    batch = ds[0]
    np.testing.assert_array_equal(batch["image"][:, 0, 0, 0] * 255, batch["label"] % 256)
    assert batch["weight"].tolist() == [1.0] * 100


def test_batches_span_epoch_boundaries():
    x, y = synthetic(300)
    ds = images.train_dataset(x, y, global_batch_size=128, seed=0)
    stream = np.concatenate([b["label"] for b in take(ds, range(5))])  # 640 rows
    assert sorted(stream[:300].tolist()) == list(range(300))
    assert sorted(stream[300:600].tolist()) == list(range(300))


@pytest.mark.parametrize("augment", ["none", "shift"])
def test_two_processes_split_the_global_batches(augment, mnist_train):
    x, y = mnist_train
    kwargs = {"global_batch_size": 64, "seed": 7, "augment": augment}
    single = images.train_dataset(x, y, **kwargs)
    halves = [
        images.train_dataset(x, y, process_index=p, process_count=2, **kwargs) for p in range(2)
    ]
    for step in [0, 1, 937, 938]:  # 60,000 / 64 = 937.5: step 937 spans two epochs.
        joined = {k: np.concatenate([h[step][k] for h in halves]) for k in single[step]}
        assert joined["image"].shape == (64, 28, 28, 1)
        assert_batches_equal(joined, single[step])


@pytest.mark.parametrize("dy, dx", [(0, 0), (2, -1), (-2, 2), (1, 0)])
def test_shift_equals_explicit_translation(dy, dx):
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (3, 6, 5, 2), dtype=np.uint8)
    offsets = np.full((3, 2), [images.MAX_SHIFT - dy, images.MAX_SHIFT - dx])
    shifted = images.shift(batch, offsets)
    for image, moved in zip(batch, shifted):
        np.testing.assert_array_equal(moved, expected_shift(image, dy, dx))


def test_shift_augmentation(mnist_train):
    x, y = mnist_train
    x, y = x[:256], y[:256]
    plain = images.train_dataset(x, y, global_batch_size=128, seed=5)
    shifted = images.train_dataset(x, y, global_batch_size=128, seed=5, augment="shift")
    moves = {}  # (epoch, example) -> (dy, dx)
    for step in range(4):  # Two epochs of two batches.
        a, b = plain[step], shifted[step]
        np.testing.assert_array_equal(a["label"], b["label"])  # Same order either way.
        for raw, aug in zip(a["image"], b["image"]):
            example = int(np.flatnonzero((x == np.rint(raw * 255)).all(axis=(1, 2, 3)))[0])
            candidates = [
                (dy, dx)
                for dy in range(-2, 3)
                for dx in range(-2, 3)
                if np.array_equal(aug, expected_shift(raw, dy, dx))
            ]
            assert candidates, f"step {step}: not a translation by up to 2 pixels"
            border = raw[:2].any() or raw[-2:].any() or raw[:, :2].any() or raw[:, -2:].any()
            if not border:  # The digit stays inside: nothing is cut off.
                np.testing.assert_allclose(aug.sum(), raw.sum(), rtol=1e-6)
            moves[(step // 2, example)] = candidates
    assert len(moves) == 512
    changed = sum(moves[(0, i)] != moves[(1, i)] for i in range(256))
    assert changed > 200  # 24 in 25 draws differ between epochs.
    assert len({m[0] for m in moves.values()}) > 20  # Many of the 25 translations.


def test_unknown_augment_names_the_options(mnist_train):
    x, y = mnist_train
    with pytest.raises(ValueError, match="'flip'.*none, shift"):
        images.train_dataset(x, y, global_batch_size=8, seed=0, augment="flip")


def test_train_iterator_resumes(data_dir):
    raw_dir(MNIST)
    kwargs = {
        "name": MNIST,
        "split": "train",
        "global_batch_size": 32,
        "seed": 1,
        "augment": "shift",
        "data_dir": data_dir,
    }
    it = images.train_iterator(**kwargs)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # As the trainer's checkpoint stores it.
    expected = next(it)
    resumed = images.train_iterator(**kwargs)
    resumed.set_state(state)
    assert_batches_equal(next(resumed), expected)
    fresh = images.train_iterator(**kwargs)
    assert (next(fresh)["label"] != expected["label"]).any()
    assert expected["image"].shape == (32, 28, 28, 1) and expected["image"].max() <= 1.0
