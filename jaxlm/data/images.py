"""Image classification data: a split's images and labels in memory -> Grain batches.

Public functions:

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

`jaxlm_mnist` and `jaxlm_fashion_mnist` are TFDS builders (`builders`) over the
gzipped IDX files (`readers.read_idx`) in `$JAXLM_DATA_DIR/mnist` and
`$JAXLM_DATA_DIR/fashion_mnist` (LeCun's file names): splits 'train' (60,000)
and 'test' (10,000), features {'image': uint8[28, 28, 1], 'label':
ClassLabel(10)}, examples in file order.
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
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds

from jaxlm.data import batching, builders

MNIST = builders.MNIST
FASHION_MNIST = builders.FASHION_MNIST
AUGMENTATIONS = ("none", "shift")
MAX_SHIFT = 2  # 'shift' translates by -MAX_SHIFT..MAX_SHIFT pixels on each axis.
_READ_CHUNK = 10_000
_CACHE_SIZE = 8
_images_cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def get_builder(name: str, *, data_dir: str = "", input_dir: str = "") -> tfds.core.DatasetBuilder:
    """Returns the prepared builder `jaxlm_mnist` or `jaxlm_fashion_mnist` (preparing it once).

    `input_dir` overrides where the IDX files are read from when preparing.
    """
    _check_builder(name)
    return builders.get_builder(name, data_dir=data_dir, input_dir=input_dir)


def _check_builder(name: str) -> None:
    if name not in builders.IMAGE_BUILDERS:
        raise ValueError(
            f"{name!r} is not a jaxlm image builder ({', '.join(builders.IMAGE_BUILDERS)})."
        )


def _data_source(name: str, split: str, data_dir: str) -> Any:
    if name in builders.IMAGE_BUILDERS:
        builder = get_builder(name, data_dir=data_dir)
        builders.check_split(name, split, builder)
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
    if name in builders.IMAGE_BUILDERS:
        return builders.make_builder(name, data_dir=data_dir).info.features
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
    batching.per_process_batch_size(global_batch_size, process_index, process_count)
    _check_augment(augment)
    count = len(images)
    if count < global_batch_size or len(labels) != count:
        raise ValueError(
            f"Training needs at least one global batch ({global_batch_size}) of examples and"
            f" one label per image; got {count} images and {len(labels)} labels."
        )

    def gather(positions: np.ndarray) -> dict[str, np.ndarray]:
        indices, offsets = _train_rows(positions, seed, count)
        batch = images[indices]
        if augment == "shift":
            batch = shift(batch, offsets)
        return _batch(batch, labels[indices], np.ones(len(positions), np.float32))

    return batching.gathered_batches(
        gather,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
    )


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
    return batching.iterate(ds, num_threads, prefetch_buffer_size)


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
    batching.per_process_batch_size(global_batch_size, process_index, process_count)
    images, labels = get_images(name, split, data_dir=data_dir)
    padding = {
        "image": np.zeros(images.shape[1:], np.float32),
        "label": np.int32(0),
        "weight": np.float32(0),
    }
    return batching.eval_batches(
        len(images),
        lambda rows: _batch(images[rows], labels[rows], np.ones(len(rows), np.float32)),
        global_batch_size=global_batch_size,
        max_batches=max_batches,
        process_index=process_index,
        process_count=process_count,
        padding=padding,
    )
