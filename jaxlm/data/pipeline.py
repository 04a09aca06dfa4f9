"""Causal-LM input pipeline: documents -> one token stream -> packed windows -> Grain.

Public functions (all keyword-only after the first argument):

  build_tokenizer(kind, *, workdir, name, split='train', model_path='',
                  data_dir='', files='', text_key='text') -> Tokenizer
  token_stream(*, name, split, tokenizer, data_dir='', files='',
               text_key='text') -> np.ndarray
  pack(tokens, seq_len) -> np.ndarray                      # [windows, seq_len + 1]
  train_dataset(tokens, *, seq_len, global_batch_size, seed, process_index=0,
                process_count=1) -> grain.MapDataset
  iterate(ds, num_threads=2, prefetch_buffer_size=8) -> grain.DatasetIterator
                                                           # any jaxlm MapDataset of batches
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
the process: fine for corpora up to a few GB of tokens, not beyond.

Training order: windows are shuffled with `seed`, reshuffled every epoch (a
different permutation per epoch, each window once per epoch; after the first
epoch the window boundaries shift by a random offset per epoch), and batched into
global batches; process p of P gets rows p*b..(p+1)*b of every global batch, so
the global batches do not depend on the process count. The returned
`grain.DatasetIterator` is checkpointable: `get_state()` is a small
JSON-serialisable dict and `set_state(state)` continues with the next batch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import grain
import numpy as np

from jaxlm.data import builders
from jaxlm.data import tokenizers

TOKENIZER_DIR = "tokenizer"
_CACHE_SIZE = 8
_stream_cache: dict[tuple, np.ndarray] = {}


def build_tokenizer(
    kind: str,
    *,
    workdir: str | os.PathLike[str],
    name: str,
    split: str = "train",
    model_path: str = "",
    data_dir: str = "",
    files: str = "",
    text_key: str = "text",
) -> tokenizers.Tokenizer:
    """Loads `WORKDIR/tokenizer`, or creates the tokenizer and saves it there.

    A 'char' tokenizer takes its vocabulary from the text of `split` of `name`.
    Saving it in the workdir pins the ids for the rest of the run (resumes,
    generation) even if the data changes later.

    Args:
      kind: 'char', 'byte' or 'sentencepiece'.
      workdir: the run's directory.
      name: the data set (see `builders.get_source`), used by 'char'.
      split: the split whose characters form the 'char' vocabulary.
      model_path: the `.model` file for 'sentencepiece'.
      data_dir: see `builders.get_source`.
      files: see `builders.get_source`.
      text_key: see `builders.get_source`.

    Returns:
      The tokenizer.
    """
    directory = Path(workdir) / TOKENIZER_DIR
    if tokenizers.exists(directory):
        tokenizer = tokenizers.load(directory)
        if tokenizer.kind != kind:
            raise ValueError(
                f"{str(directory)!r} holds a {tokenizer.kind!r} tokenizer but"
                f" {kind!r} was asked for; use another workdir or the same kind."
            )
        return tokenizer
    texts = None
    if kind == "char":
        source = builders.get_source(name, split, data_dir=data_dir, files=files, text_key=text_key)
        texts = source.iter_texts()
    tokenizer = tokenizers.create(kind, texts=texts, model_path=model_path)
    tokenizer.save(directory)
    return tokenizer


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


def _per_process_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
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
    b = _per_process_batch_size(global_batch_size, process_index, process_count)
    window = seq_len + 1
    count = max(len(tokens) - seq_len, 0) // window  # windows that fit at every offset
    _check_windows(pack(tokens, seq_len)[:count], global_batch_size, "The training data")

    def cut(index: int, j: int) -> dict[str, np.ndarray]:
        epoch = index // count
        offset = int(np.random.default_rng([seed, epoch]).integers(window)) if epoch else 0
        start = offset + int(j) * window
        return _inputs_targets(tokens[start : start + window])

    ds = grain.MapDataset.range(count).shuffle(seed=seed).repeat().map_with_index(cut)
    ds = ds.batch(b, drop_remainder=True)[process_index::process_count]
    return ds


def iterate(ds: grain.MapDataset, num_threads: int = 2,
            prefetch_buffer_size: int = 8) -> grain.DatasetIterator:
    """An endless, checkpointable iterator over the batches of `ds`, read by `num_threads`
    Grain threads, `prefetch_buffer_size` batches ahead. `get_state()` / `set_state()` save and
    restore the position (restore into an iterator built with the same arguments)."""
    read_options = grain.ReadOptions(num_threads=num_threads,
                                     prefetch_buffer_size=prefetch_buffer_size)
    return iter(ds.to_iter_dataset(read_options))


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
    return iterate(ds, num_threads, prefetch_buffer_size)


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
    b = _per_process_batch_size(global_batch_size, process_index, process_count)
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
    num_batches = len(windows) // global_batch_size
    if max_batches > 0:
        num_batches = min(num_batches, max_batches)
    batches = windows[: num_batches * global_batch_size].reshape(
        num_batches, global_batch_size, seq_len + 1
    )
    return [
        _inputs_targets(batch[process_index * b : (process_index + 1) * b]) for batch in batches
    ]
