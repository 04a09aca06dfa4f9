"""Batching for every jaxlm pipeline: training epochs, evaluation batches, the per-process split.

A pipeline says how to make its examples (one row, or a whole batch at once); this module says
how they become batches, the same way for every data set:

  per_process_batch_size(global_batch_size, process_index, process_count) -> int
  shuffled_epochs(count, seed, example) -> grain.MapDataset      # endless, one row per element
  length_bucketed_epochs(lengths, seed, example, *, window,
                         batch_size) -> grain.MapDataset          # the same, rows of a batch alike
  per_process_batches(ds, *, global_batch_size, process_index=0,
                      process_count=1) -> grain.MapDataset
  gathered_batches(gather, *, global_batch_size, process_index=0,
                   process_count=1) -> grain.MapDataset          # a whole batch per element
  iterate(ds, num_threads=2, prefetch_buffer_size=8) -> grain.DatasetIterator
  stack(rows, keys=None) -> dict[str, np.ndarray]
  eval_batches(count, gather, *, global_batch_size, max_batches=0, process_index=0,
               process_count=1, padding=None) -> list[dict[str, np.ndarray]]

The per-process split: the G rows of a global batch are the rows of all P processes, and
process p holds rows p*b..(p+1)*b (b = G / P), so the global batches do not depend on the
process count.

Training: `shuffled_epochs` is a new permutation of the `count` examples every epoch (Grain's
shuffle before repeat derives a new seed per epoch), repeated forever; `per_process_batches`
cuts it into batches of b rows and keeps batches p, p + P, ..., i.e. rows p*b..(p+1)*b of every
global batch (batches may span an epoch boundary). `gathered_batches` serves pipelines that
build a whole batch at once from its positions in the endless stream. Either way, `iterate`
gives a checkpointable iterator: `get_state()` is a small JSON-serialisable dict and
`set_state(state)` continues with the next batch.

Evaluation (the one padding rule): rows 0..count-1 in order, global batch j holds rows
j*G..(j+1)*G, split between processes as above. A last global batch that the rows do not fill
is padded with copies of `padding` (a row whose weight is 0, so metrics skip it) when the
pipeline gives one, else dropped.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grain
import numpy as np

Batch = dict[str, np.ndarray]


def per_process_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
    """b = global_batch_size // process_count, after checking the three numbers.

    Raises:
      ValueError: when a size is not positive, G is not divisible by P, or p is not in [0, P).
    """
    if global_batch_size < 1 or process_count < 1:
        raise ValueError(
            f"global_batch_size ({global_batch_size}) and process_count"
            f" ({process_count}) must be positive."
        )
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not divisible by"
            f" process_count {process_count}."
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count}).")
    return global_batch_size // process_count


def shuffled_epochs(
    count: int, seed: int, example: Callable[[int, int], Any]
) -> grain.MapDataset:
    """`example(epoch, i)` for the examples i of every epoch, each epoch a new permutation.

    Endless: element n is example `order_e[n % count]` of epoch e = n // count.
    """
    ds = grain.MapDataset.range(count).shuffle(seed=seed).repeat()
    return ds.map_with_index(lambda index, i: example(index // count, int(i)))


def length_bucketed_epochs(
    lengths: Sequence[int], seed: int, example: Callable[[int, int], Any], *, window: int,
    batch_size: int,
) -> grain.MapDataset:
    """`shuffled_epochs` whose batches hold examples of similar lengths ("bucketing").

    The endless shuffled stream is cut into windows of `window` examples (a multiple of
    `batch_size`); each window is sorted by `lengths`, cut into batches of `batch_size`
    consecutive examples, and its batches are put in a seeded random order (rows within a batch
    too). Every example still comes once per epoch, in a random batch; a batch cut to its
    longest row then costs about its own length instead of the longest in the data.
    """
    if window < batch_size or window % batch_size:
        raise ValueError(f"the bucketing window ({window} examples) must be a positive multiple of the "
                         f"batch size ({batch_size})")
    count, lengths = len(lengths), np.asarray(lengths)
    stream = grain.MapDataset.range(count).shuffle(seed=seed).repeat()

    @functools.lru_cache(maxsize=4)
    def window_order(w: int) -> np.ndarray:
        indices = np.array([stream[n] for n in range(w * window, (w + 1) * window)])
        by_length = indices[np.argsort(lengths[indices], kind="stable")].reshape(-1, batch_size)
        rng = np.random.default_rng([seed, w])
        by_length = by_length[rng.permutation(len(by_length))]
        return rng.permuted(by_length, axis=1).reshape(-1)

    return grain.MapDataset.range(sys.maxsize).map(
        lambda n: example(n // count, int(window_order(n // window)[n % window])))


def per_process_batches(
    ds: grain.MapDataset,
    *,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """Batches of b = G / P rows of `ds`, keeping p, p + P, ...: rows p*b..(p+1)*b of each
    global batch."""
    b = per_process_batch_size(global_batch_size, process_index, process_count)
    return ds.batch(b, drop_remainder=True)[process_index::process_count]


def gathered_batches(
    gather: Callable[[np.ndarray], Batch],
    *,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """Element j is `gather(positions)`: this process's rows of global batch j, at positions
    j*G + p*b + r (r < b) of the pipeline's endless stream of examples."""
    b = per_process_batch_size(global_batch_size, process_index, process_count)
    rows = process_index * b + np.arange(b)
    # As long as Grain's endless `repeat()`; the iterator state is the next step.
    return grain.MapDataset.range(sys.maxsize).map(lambda step: gather(step * global_batch_size + rows))


def iterate(
    ds: grain.MapDataset, num_threads: int = 2, prefetch_buffer_size: int = 8
) -> grain.DatasetIterator:
    """An endless, checkpointable iterator over the batches of `ds`, read by `num_threads`
    Grain threads, `prefetch_buffer_size` batches ahead. `get_state()` / `set_state()` save and
    restore the position (restore into an iterator built with the same arguments)."""
    read_options = grain.ReadOptions(
        num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size
    )
    return iter(ds.to_iter_dataset(read_options))


def stack(rows: Sequence[dict[str, Any]], keys: Iterable[str] | None = None) -> Batch:
    """One batch from rows of equal keys: `np.stack` per key (of `keys`, default the first
    row's)."""
    return {key: np.stack([row[key] for row in rows]) for key in (keys or rows[0])}


def _pad(batch: Batch | None, padding: dict[str, Any], count: int) -> Batch:
    """`batch` followed by `count` copies of the row `padding`."""
    filled = {}
    for key, value in padding.items():
        value = np.asarray(value)
        rows = np.broadcast_to(value, (count, *value.shape))
        filled[key] = rows.copy() if batch is None else np.concatenate([batch[key], rows])
    return filled


def eval_batches(
    count: int,
    gather: Callable[[np.ndarray], Batch],
    *,
    global_batch_size: int,
    max_batches: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    padding: dict[str, Any] | None = None,
) -> list[Batch]:
    """This process's evaluation batches over rows 0..count-1, in order (see the module
    docstring).

    Args:
      count: the number of rows.
      gather: row indices (ascending, in [0, count)) -> their batch.
      global_batch_size: rows per global batch over all processes.
      max_batches: > 0 keeps only the first global batches.
      process_index: this process.
      process_count: number of processes.
      padding: the row that fills a last global batch; None drops that batch.

    Returns:
      The batches of b = global_batch_size // process_count rows.
    """
    b = per_process_batch_size(global_batch_size, process_index, process_count)
    if padding is None:
        num_batches = count // global_batch_size
    else:
        num_batches = -(-count // global_batch_size)
    if max_batches > 0:
        num_batches = min(num_batches, max_batches)
    batches = []
    for j in range(num_batches):
        first = j * global_batch_size + process_index * b
        real = np.arange(first, min(first + b, count))
        batch = gather(real) if len(real) else None
        if len(real) < b:
            batch = _pad(batch, padding, b - len(real))
        batches.append(batch)
    return batches
