"""Causal-LM data: documents -> one token stream -> windows of seq_len + 1 tokens -> batches.

Public functions (all keyword-only after the first argument):

  token_stream(*, name, split, tokenizer, data_dir='', files='',
               text_key='text') -> np.ndarray
  pack(tokens, seq_len) -> np.ndarray                      # [windows, seq_len + 1]
  train_dataset(tokens, *, seq_len, global_batch_size, seed, process_index=0,
                process_count=1) -> grain.MapDataset
  train_iterator(*, name, split, tokenizer, seq_len, global_batch_size, seed,
                 process_index=0, process_count=1, data_dir='', files='',
                 text_key='text', num_threads=2,
                 prefetch_buffer_size=8) -> grain.DatasetIterator
  eval_batches(*, name, split, tokenizer, seq_len, global_batch_size,
               max_batches=0, process_index=0, process_count=1, data_dir='',
               files='', text_key='text') -> list[dict[str, np.ndarray]]

`name`, `split`, `data_dir`, `files` and `text_key` select the documents as in
`builders.get_source`. A batch is `{'inputs': int32[b, seq_len],
'targets': int32[b, seq_len]}` with `targets` = `inputs` shifted left by one and
b = global_batch_size // process_count rows for this process.

The documents of a split are tokenized and joined into one stream (the
tokenizer's `eos_id` between documents when it has one; chunks of one logical
document, such as Tiny Shakespeare, are joined as text first), then cut into
non-overlapping windows of seq_len + 1 tokens; the tail that does not fill a
window is dropped. The whole stream is held in memory (uint16 when the
vocabulary fits, else int32) and cached per (source, split, tokenizer) within
the process: fine for corpora up to a few GB of tokens, not beyond. T5's span
corruption (`span_corruption`) cuts the same stream.

Training order: windows are shuffled with `seed`, reshuffled every epoch (a
different permutation per epoch, each window once per epoch; after the first
epoch the window boundaries shift by a random offset per epoch), and batched as
`batching` does for every pipeline (process p of P gets rows p*b..(p+1)*b of every
global batch). Evaluation: windows in order; the windows that do not fill a last
global batch are dropped (`batching.eval_batches` without padding: the batches
carry no weights). The iterator is checkpointable (see `batching.iterate`).
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from jaxlm.data import batching, builders, tokenizers

_CACHE_SIZE = 8
_stream_cache: dict[tuple, np.ndarray] = {}


def _encode_source(source: builders.TextSource, tokenizer: tokenizers.Tokenizer) -> np.ndarray:
    if source.one_document:
        return tokenizer.encode("".join(source.iter_texts()))
    pieces = []
    separator = None if tokenizer.eos_id is None else np.array([tokenizer.eos_id], np.int32)
    for i, text in enumerate(source.iter_texts()):
        if i and separator is not None:
            pieces.append(separator)
        pieces.append(tokenizer.encode(text))
    return np.concatenate(pieces) if pieces else np.zeros([0], np.int32)


def token_stream(
    *,
    name: str,
    split: str,
    tokenizer: tokenizers.Tokenizer,
    data_dir: str = "",
    files: str = "",
    text_key: str = "text",
) -> np.ndarray:
    """Returns the tokens of all documents of a split as one read-only array.

    Cached per (name, split, data_dir, files, text_key, tokenizer) within the
    process. For Tiny Shakespeare with a char tokenizer this equals nanoGPT's
    `np.array(encode(split_text))`.
    """
    key = (name, split, builders.tfds_data_dir(data_dir), files, text_key, tokenizer.fingerprint)
    if key not in _stream_cache:
        source = builders.get_source(name, split, data_dir=data_dir, files=files, text_key=text_key)
        tokens = _encode_source(source, tokenizer)
        dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
        tokens = tokens.astype(dtype)
        tokens.setflags(write=False)
        if len(_stream_cache) >= _CACHE_SIZE:
            _stream_cache.pop(next(iter(_stream_cache)))
        _stream_cache[key] = tokens
    return _stream_cache[key]


def pack(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Cuts `tokens` into non-overlapping windows: [len(tokens) // (seq_len + 1), seq_len + 1].

    A view, not a copy; the tail that does not fill a window is dropped.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive; got {seq_len}.")
    n = len(tokens) // (seq_len + 1)
    return tokens[: n * (seq_len + 1)].reshape(n, seq_len + 1)


def _inputs_targets(windows: np.ndarray) -> dict[str, np.ndarray]:
    windows = np.asarray(windows, dtype=np.int32)
    return {"inputs": windows[..., :-1], "targets": windows[..., 1:]}


def _check_windows(windows: np.ndarray, global_batch_size: int, what: str) -> None:
    if len(windows) < global_batch_size:
        raise ValueError(
            f"{what} has {len(windows)} windows of seq_len + 1 = {windows.shape[1]} tokens,"
            f" fewer than one global batch of {global_batch_size}; lower seq_len or"
            " global_batch_size, or use more data."
        )


def train_dataset(
    tokens: np.ndarray,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """Shuffled, repeated, batched windows of `tokens` for one process (an infinite MapDataset).

    Epoch 0 cuts the stream into the windows of `pack`; every later epoch shifts all window
    boundaries by an offset drawn from (seed, epoch), so a model trained for several epochs sees
    new windows rather than the same ones again (nanoGPT draws every window at a random offset).
    Shuffle before repeat: Grain's shuffle derives a new seed for every epoch from the index, so
    each epoch is a new permutation. Global batch j is the shuffled rows j*G..(j+1)*G; batching by
    b = G/P and keeping batches p, p+P, p+2P, ... gives process p rows p*b..(p+1)*b of every
    global batch (batches may span an epoch boundary).

    Args:
      tokens: the token stream of the split (see `token_stream`).
      seq_len: tokens per example.
      global_batch_size: rows per step over all processes.
      seed: shuffle and offset seed (0 <= seed < 2**32).
      process_index: this process.
      process_count: number of processes.

    Returns:
      A MapDataset of `{'inputs', 'targets'}` batches of int32[b, seq_len].
    """
    batching.per_process_batch_size(global_batch_size, process_index, process_count)
    window = seq_len + 1
    count = max(len(tokens) - seq_len, 0) // window  # windows that fit at every offset
    _check_windows(pack(tokens, seq_len)[:count], global_batch_size, "The training data")

    def cut(epoch: int, j: int) -> dict[str, np.ndarray]:
        offset = int(np.random.default_rng([seed, epoch]).integers(window)) if epoch else 0
        start = offset + j * window
        return _inputs_targets(tokens[start : start + window])

    return batching.per_process_batches(
        batching.shuffled_epochs(count, seed, cut),
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
    )


def train_iterator(
    *,
    name: str,
    split: str,
    tokenizer: tokenizers.Tokenizer,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    data_dir: str = "",
    files: str = "",
    text_key: str = "text",
    num_threads: int = 2,
    prefetch_buffer_size: int = 8,
) -> grain.DatasetIterator:
    """Returns an endless, checkpointable iterator of this process's training batches.

    Args:
      name: data set (see `builders.get_source`).
      split: e.g. 'train'.
      tokenizer: see `build_tokenizer`.
      seq_len: tokens per example.
      global_batch_size: rows per step over all processes; must be divisible by
        process_count.
      seed: shuffle seed.
      process_index: `jax.process_index()`.
      process_count: `jax.process_count()`.
      data_dir: see `builders.get_source`.
      files: see `builders.get_source`.
      text_key: see `builders.get_source`.
      num_threads: Grain reader threads.
      prefetch_buffer_size: batches read ahead.

    Returns:
      A `grain.DatasetIterator`; `get_state()` / `set_state()` save and restore
      the position (restore into an iterator built with the same arguments).
    """
    tokens = token_stream(
        name=name,
        split=split,
        tokenizer=tokenizer,
        data_dir=data_dir,
        files=files,
        text_key=text_key,
    )
    _check_windows(
        pack(tokens, seq_len),
        global_batch_size,
        f"Split {split!r} of {name} ({len(tokens)} tokens)",
    )
    ds = train_dataset(
        tokens,
        seq_len=seq_len,
        global_batch_size=global_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
    )
    return batching.iterate(ds, num_threads, prefetch_buffer_size)


def eval_batches(
    *,
    name: str,
    split: str,
    tokenizer: tokenizers.Tokenizer,
    seq_len: int,
    global_batch_size: int,
    max_batches: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    data_dir: str = "",
    files: str = "",
    text_key: str = "text",
) -> list[dict[str, Any]]:
    """Returns the first `max_batches` (<= 0: all) evaluation batches of this process.

    Windows in order, no shuffle, the same every call; the windows that do not
    fill a last global batch are dropped. Rows are split between processes as
    in `train_dataset`.
    """
    batching.per_process_batch_size(global_batch_size, process_index, process_count)
    tokens = token_stream(
        name=name,
        split=split,
        tokenizer=tokenizer,
        data_dir=data_dir,
        files=files,
        text_key=text_key,
    )
    windows = pack(tokens, seq_len)
    _check_windows(windows, global_batch_size, f"Split {split!r} of {name} ({len(tokens)} tokens)")
    return batching.eval_batches(
        len(windows),
        lambda rows: _inputs_targets(windows[rows]),
        global_batch_size=global_batch_size,
        max_batches=max_batches,
        process_index=process_index,
        process_count=process_count,
    )
