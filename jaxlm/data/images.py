"""Image classification data: IDX files (MNIST, Fashion-MNIST) as TFDS builders, Grain batches.

Public functions:

  read_idx(path, magic) -> np.ndarray                     # uint8, shape from the header
  read_idx_split(directory, prefix) -> (uint8[n, H, W, 1], uint8[n])
  get_builder(name, *, data_dir='', input_dir='') -> tfds.core.DatasetBuilder
  get_images(name, split, *, data_dir='') -> (uint8[n, H, W, C], int32[n])
  num_classes(name, *, data_dir='') -> int
  image_shape(name, *, data_dir='') -> (H, W, C)
  train_dataset(images, labels, *, global_batch_size, seed, augment='none',
                process_index=0, process_count=1) -> grain.MapDataset
  train_iterator(*, name, split, global_batch_size, seed, augment='none', data_dir='',
                 process_index=0, process_count=1, num_threads=2,
                 prefetch_buffer_size=8) -> grain.DatasetIterator
  eval_batches(*, name, split, global_batch_size, max_batches=0, data_dir='',
               process_index=0, process_count=1) -> list[dict[str, np.ndarray]]
  shift(images, offsets) -> np.ndarray                    # the 'shift' augmentation

`jaxlm_mnist` and `jaxlm_fashion_mnist` are TFDS builders over the gzipped IDX
files in `$JAXLM_DATA_DIR/mnist` and `$JAXLM_DATA_DIR/fashion_mnist` (LeCun's
file names): splits 'train' (60,000) and 'test' (10,000), features
{'image': uint8[28, 28, 1], 'label': ClassLabel(10)}, examples in file order.
They prepare on first use into `data_dir` (see `builders.tfds_data_dir`) and
are then read as array_record data sources, without TensorFlow. Any other name
is a TFDS catalog data set with features 'image' and 'label', read with
`tfds.data_source` (e.g. `mnist`, downloaded when online; its PNG images need
Pillow or OpenCV to decode). The jaxlm builders store the image as a raw uint8
tensor rather than `tfds.features.Image`, so reading them needs neither.

A split is held in memory as numpy arrays, cached per (name, split, data_dir)
within the process. A batch is `{'image': float32[b, H, W, C]` (pixel / 255),
`'label': int32[b]`, `'weight': float32[b]}` with b = global_batch_size //
process_count rows for this process; `weight` is 0 for the zero rows that pad
the last evaluation batch, else 1.

Training order: every epoch is a new permutation of the examples, drawn from
(seed, epoch); the epochs are joined into one endless stream and cut into
global batches; process p of P gets rows p*b..(p+1)*b of every global batch, so
the global batches do not depend on the process count. A batch is gathered
(and augmented) at once with numpy, not example by example. The iterator is
checkpointable: `get_state()` is a small JSON-serialisable dict.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import sys
import zlib
from pathlib import Path
from typing import Any, ClassVar

import grain
import numpy as np
import tensorflow_datasets as tfds

from jaxlm.data import builders, pipeline

MNIST = "jaxlm_mnist"
FASHION_MNIST = "jaxlm_fashion_mnist"
IMAGES_MAGIC = 2051  # IDX: uint8 data (0x08), 3 dimensions.
LABELS_MAGIC = 2049  # IDX: uint8 data (0x08), 1 dimension.
AUGMENTATIONS = ("none", "shift")
MAX_SHIFT = 2  # 'shift' translates by -MAX_SHIFT..MAX_SHIFT pixels on each axis.
_SPLIT_FILES = {"train": "train", "test": "t10k"}  # split -> IDX file name prefix
_NUM_CLASSES = 10
_IMAGE_SHAPE = (28, 28, 1)
_READ_CHUNK = 10_000
_CACHE_SIZE = 8
_images_cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def read_idx(path: str | os.PathLike[str], magic: int) -> np.ndarray:
    """Returns the uint8 data of an IDX file (gzipped when its name ends in `.gz`).

    Args:
      path: the file.
      magic: the expected magic number, `IMAGES_MAGIC` or `LABELS_MAGIC`; its
        low byte is the number of dimensions.

    Returns:
      A read-only uint8 array of the shape the header gives.

    Raises:
      ValueError: naming the file, when it is not valid gzip, has another magic
        number, or holds more or fewer bytes than its header says.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise ValueError(f"{str(path)!r} is not a readable gzip file: {e}") from e
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    found = int.from_bytes(data[:4], "big")
    if len(data) < header or found != magic:
        raise ValueError(
            f"{str(path)!r} is not an IDX file with magic number {magic}: found {found}"
            f" in a file of {len(data)} bytes."
        )
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    if len(data) - header != math.prod(shape):
        raise ValueError(
            f"{str(path)!r}: the header gives shape {shape} ({math.prod(shape)} bytes) but"
            f" {len(data) - header} bytes of data follow it."
        )
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def read_idx_split(directory: str | os.PathLike[str], prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns (uint8[n, H, W, 1], uint8[n]) from `PREFIX-images-idx3-ubyte.gz` and its labels."""
    images_path = Path(directory) / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = Path(directory) / f"{prefix}-labels-idx1-ubyte.gz"
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC)
    if len(images) != len(labels):
        raise ValueError(
            f"{str(images_path)!r} holds {len(images)} images but {str(labels_path)!r}"
            f" {len(labels)} labels."
        )
    if len(labels) and labels.max() >= _NUM_CLASSES:
        raise ValueError(f"{str(labels_path)!r} has label {labels.max()} >= {_NUM_CLASSES}.")
    return images[..., None], labels


class _IdxImages(builders._LocalCodePath, tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """28x28 grey images in 10 classes from IDX files; subclasses name the data directory.

    Examples keep the order of the files (`disable_shuffling`), so example i of
    a split is image i of its IDX file.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "IDX files as uint8 tensors, in file order."
    }
    SUBDIR = ""
    HOMEPAGE = ""

    def __init__(self, *, input_dir: str = "", **kwargs: Any):
        """Args: input_dir: the IDX files (default `$JAXLM_DATA_DIR/SUBDIR`)."""
        self._input_dir = input_dir
        super().__init__(**kwargs)

    @property
    def input_dir(self) -> Path:
        return Path(self._input_dir or builders.jaxlm_data_dir() / self.SUBDIR)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"{self.SUBDIR} from its IDX files (LeCun's format and file names).",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=_IMAGE_SHAPE, dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=_NUM_CLASSES),
                }
            ),
            supervised_keys=("image", "label"),
            homepage=self.HOMEPAGE,
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        del dl_manager  # Offline: the files are local.
        if not self.input_dir.is_dir():
            raise FileNotFoundError(
                f"{self.name}: no directory {str(self.input_dir)!r}. Set $JAXLM_DATA_DIR to the"
                f" directory holding {self.SUBDIR}/ with the gzipped IDX files."
            )
        # Parsed here, before TFDS writes anything, so that a bad file fails fast.
        return {
            split: self._generate_examples(*read_idx_split(self.input_dir, prefix))
            for split, prefix in _SPLIT_FILES.items()
        }

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray) -> Any:
        for i, (image, label) in enumerate(zip(images, labels)):
            yield i, {"image": image, "label": int(label)}


class JaxlmMnist(_IdxImages):
    """MNIST handwritten digits from `$JAXLM_DATA_DIR/mnist`."""

    SUBDIR = "mnist"
    HOMEPAGE = "http://yann.lecun.com/exdb/mnist/"


class JaxlmFashionMnist(_IdxImages):
    """Fashion-MNIST (Zalando) from `$JAXLM_DATA_DIR/fashion_mnist`."""

    SUBDIR = "fashion_mnist"
    HOMEPAGE = "https://github.com/zalandoresearch/fashion-mnist"


_BUILDERS = {MNIST: JaxlmMnist, FASHION_MNIST: JaxlmFashionMnist}


def _make_builder(name: str, data_dir: str, input_dir: str = "") -> tfds.core.DatasetBuilder:
    if name not in _BUILDERS:
        raise ValueError(f"{name!r} is not a jaxlm image builder ({', '.join(_BUILDERS)}).")
    return _BUILDERS[name](
        input_dir=input_dir, data_dir=builders.tfds_data_dir(data_dir), file_format="array_record"
    )


def get_builder(name: str, *, data_dir: str = "", input_dir: str = "") -> tfds.core.DatasetBuilder:
    """Returns the prepared builder `jaxlm_mnist` or `jaxlm_fashion_mnist` (preparing it once).

    `input_dir` overrides where the IDX files are read from when preparing.
    """
    return builders.prepared(functools.partial(_make_builder, name, data_dir, input_dir), name, data_dir)


def _data_source(name: str, split: str, data_dir: str) -> Any:
    if name in _BUILDERS:
        builder = get_builder(name, data_dir=data_dir)
        builders._check_split(name, split, builder)
        return builder.as_data_source(split=split)
    return tfds.data_source(name, split=split, data_dir=data_dir or None, download=True)


def _read_all(source: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads every example of `source`, `_READ_CHUNK` at a time, into two arrays."""
    images, labels = [], []
    for start in range(0, len(source), _READ_CHUNK):
        examples = source.__getitems__(list(range(start, min(start + _READ_CHUNK, len(source)))))
        if "image" not in examples[0] or "label" not in examples[0]:
            raise KeyError(f"{name} has features {sorted(examples[0])}, not 'image' and 'label'.")
        images.append(np.stack([e["image"] for e in examples]))
        labels.append(np.array([e["label"] for e in examples], np.int32))
    if not images:
        raise ValueError(f"{name}: the split is empty.")
    images, labels = np.concatenate(images), np.concatenate(labels)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(
            f"{name}: expected uint8 images [n, H, W, C]; got {images.dtype} {images.shape}."
        )
    return images, labels


def get_images(name: str, split: str, *, data_dir: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Returns all images and labels of a split, read-only, in example order.

    Cached per (name, split, data_dir) within the process.

    Args:
      name: `jaxlm_mnist`, `jaxlm_fashion_mnist` or a TFDS catalog name whose
        features include 'image' (fixed shape, uint8) and 'label'.
      split: e.g. 'train' or 'test' (TFDS slicing such as 'train[:10%]' works).
      data_dir: where prepared data lives (see `builders.tfds_data_dir`).

    Returns:
      (images uint8[n, H, W, C], labels int32[n]).
    """
    key = (name, split, builders.tfds_data_dir(data_dir))
    if key not in _images_cache:
        images, labels = _read_all(_data_source(name, split, data_dir), name)
        images.setflags(write=False)
        labels.setflags(write=False)
        if len(_images_cache) >= _CACHE_SIZE:
            _images_cache.pop(next(iter(_images_cache)))
        _images_cache[key] = (images, labels)
    return _images_cache[key]


def _features(name: str, data_dir: str) -> tfds.features.FeaturesDict:
    """The features of `name`, read from the builder's metadata (nothing is prepared)."""
    if name in _BUILDERS:
        return _make_builder(name, data_dir).info.features
    return tfds.builder(name, data_dir=data_dir or None).info.features


def num_classes(name: str, *, data_dir: str = "") -> int:
    """The number of classes of the 'label' feature of `name`."""
    return int(_features(name, data_dir)["label"].num_classes)


def image_shape(name: str, *, data_dir: str = "") -> tuple[int, int, int]:
    """The (H, W, C) of the 'image' feature of `name`; variable sizes are an error."""
    shape = tuple(_features(name, data_dir)["image"].shape)
    if len(shape) != 3 or None in shape:
        raise ValueError(f"{name} has images of shape {shape}, not a fixed (H, W, C).")
    return shape


def _check_augment(augment: str) -> None:
    if augment not in AUGMENTATIONS:
        raise ValueError(f"Unknown augment {augment!r}; options: {', '.join(AUGMENTATIONS)}.")


@functools.lru_cache(maxsize=4)
def _epoch_draws(seed: int, epoch: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The example order of one epoch and every example's crop offsets in it.

    One generator per (seed, epoch) draws a permutation and offsets int8[count, 2]
    in [0, 2 * MAX_SHIFT] for all examples at once: as deterministic per (epoch,
    index) as a generator per example, but a batch then costs an index rather
    than b generator constructions (~17 us each). Cached: one epoch spans
    hundreds of batches.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(count)
    offsets = rng.integers(0, 2 * MAX_SHIFT + 1, size=(count, 2), dtype=np.int8)
    return order, offsets


def _train_rows(positions: np.ndarray, seed: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(example indices, crop offsets) of positions in the endless stream of epochs."""
    epochs = positions // count
    indices = np.empty(len(positions), np.intp)
    offsets = np.empty((len(positions), 2), np.int8)
    for epoch in np.unique(epochs):  # A batch spans at most two epochs.
        here = epochs == epoch
        order, epoch_offsets = _epoch_draws(seed, int(epoch), count)
        indices[here] = order[positions[here] % count]
        offsets[here] = epoch_offsets[indices[here]]
    return indices, offsets


def shift(images: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Translates each image: pads MAX_SHIFT zeros on every side, then crops at `offsets`.

    Args:
      images: [b, H, W, C].
      offsets: int[b, 2], (row, column) of the crop in [0, 2 * MAX_SHIFT]; MAX_SHIFT
        leaves an image in place, 0 moves its content down/right by MAX_SHIFT.

    Returns:
      The shifted images, same shape and dtype.
    """
    b, h, w, c = images.shape
    padded = np.zeros((b, h + 2 * MAX_SHIFT, w + 2 * MAX_SHIFT, c), images.dtype)
    padded[:, MAX_SHIFT : MAX_SHIFT + h, MAX_SHIFT : MAX_SHIFT + w] = images
    windows = np.lib.stride_tricks.sliding_window_view(padded, (h, w), axis=(1, 2))
    crops = windows[np.arange(b), offsets[:, 0], offsets[:, 1]]  # [b, C, H, W]
    return np.ascontiguousarray(np.moveaxis(crops, 1, -1))


def _batch(images: np.ndarray, labels: np.ndarray, weight: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "image": images.astype(np.float32) / np.float32(255),
        "label": labels.astype(np.int32),
        "weight": weight.astype(np.float32),
    }


def train_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    global_batch_size: int,
    seed: int,
    augment: str = "none",
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """Shuffled, repeated, batched examples for one process (an infinite MapDataset).

    Element j is this process's rows p*b..(p+1)*b of global batch j, i.e.
    positions j*G + p*b + r of the endless stream of epochs, each epoch a
    permutation drawn from (seed, epoch); batches may span an epoch boundary.
    Each element is computed a whole batch at a time with numpy (Grain's
    per-example shuffle and batch cost ~1 ms per batch of 128); the global
    batches do not depend on the process count.

    Args:
      images: uint8[n, H, W, C] (see `get_images`).
      labels: int[n].
      global_batch_size: rows per step over all processes.
      seed: shuffle and augmentation seed (a non-negative integer).
      augment: 'none', or 'shift': a random translation by up to MAX_SHIFT
        pixels on each axis (zeros fill in), drawn per (seed, epoch, index).
      process_index: this process.
      process_count: number of processes.

    Returns:
      A MapDataset of batches (see the module docstring).
    """
    b = pipeline._per_process_batch_size(global_batch_size, process_index, process_count)
    _check_augment(augment)
    count = len(images)
    if count < global_batch_size or len(labels) != count:
        raise ValueError(
            f"Training needs at least one global batch ({global_batch_size}) of examples and"
            f" one label per image; got {count} images and {len(labels)} labels."
        )
    rows = process_index * b + np.arange(b)

    def load(step: int) -> dict[str, np.ndarray]:
        indices, offsets = _train_rows(step * global_batch_size + rows, seed, count)
        batch = images[indices]
        if augment == "shift":
            batch = shift(batch, offsets)
        return _batch(batch, labels[indices], np.ones(b, np.float32))

    # As long as Grain's endless `repeat()`; the iterator state is the next step.
    return grain.MapDataset.range(sys.maxsize).map(load)


def train_iterator(
    *,
    name: str,
    split: str,
    global_batch_size: int,
    seed: int,
    augment: str = "none",
    data_dir: str = "",
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 2,
    prefetch_buffer_size: int = 8,
) -> grain.DatasetIterator:
    """Returns an endless, checkpointable iterator of this process's training batches.

    Args:
      name: data set (see `get_images`).
      split: e.g. 'train'.
      global_batch_size: rows per step over all processes; must be divisible by
        process_count.
      seed: shuffle and augmentation seed.
      augment: see `train_dataset`.
      data_dir: see `get_images`.
      process_index: `jax.process_index()`.
      process_count: `jax.process_count()`.
      num_threads: Grain reader threads.
      prefetch_buffer_size: batches read ahead.

    Returns:
      A `grain.DatasetIterator`; `get_state()` / `set_state()` save and restore
      the position (restore into an iterator built with the same arguments).
    """
    _check_augment(augment)  # Before reading the data.
    images, labels = get_images(name, split, data_dir=data_dir)
    ds = train_dataset(
        images,
        labels,
        global_batch_size=global_batch_size,
        seed=seed,
        augment=augment,
        process_index=process_index,
        process_count=process_count,
    )
    return pipeline.iterate(ds, num_threads, prefetch_buffer_size)


def _eval_batch(images: np.ndarray, labels: np.ndarray, start: int, b: int) -> dict[str, Any]:
    """Rows start..start+b, zero-padded (weight 0) past the end of the split."""
    real = max(0, min(b, len(images) - start))
    padded_images = np.zeros((b, *images.shape[1:]), images.dtype)
    padded_images[:real] = images[start : start + real]
    padded_labels = np.zeros(b, np.int32)
    padded_labels[:real] = labels[start : start + real]
    return _batch(padded_images, padded_labels, np.arange(b) < real)


def eval_batches(
    *,
    name: str,
    split: str,
    global_batch_size: int,
    max_batches: int = 0,
    data_dir: str = "",
    process_index: int = 0,
    process_count: int = 1,
) -> list[dict[str, Any]]:
    """Returns the first `max_batches` (<= 0: all) evaluation batches of this process.

    Every example once, in order: row r of global batch j is example j*G + r;
    the last global batch is filled with zero images of weight 0. Rows are split
    between processes as in `train_dataset`; the same every call.
    """
    b = pipeline._per_process_batch_size(global_batch_size, process_index, process_count)
    images, labels = get_images(name, split, data_dir=data_dir)
    num_batches = -(-len(images) // global_batch_size)
    if max_batches > 0:
        num_batches = min(num_batches, max_batches)
    return [
        _eval_batch(images, labels, j * global_batch_size + process_index * b, b)
        for j in range(num_batches)
    ]
