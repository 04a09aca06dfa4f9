"""Text pairs (translation, any text-to-text task) -> encoder-decoder batches.

Public functions:

  encode_pairs(pairs, tokenizer, *, source_prefix='') -> tuple[(source_ids, target_ids), ...]
  pairs_dataset(pairs, *, tokenizer, source_len, target_len, global_batch_size, seed, eos_id,
                bucket_batches=0, ...) -> grain.MapDataset
  pairs_train_iterator(*, num_threads=2, prefetch_buffer_size=8,
                       **pairs_dataset_kwargs) -> grain.DatasetIterator
  pairs_eval_batches(*, pairs, tokenizer, source_len, target_len, global_batch_size, eos_id,
                     max_batches=0, ...) -> list[dict[str, np.ndarray]]

Batches are the encoder-decoder rows of `encoder_decoder`. Each (source, target) pair is one
example; sources keep at most source_len - 1 tokens and targets target_len - 1, then EOS.
Encodings are cached per (pairs, tokenizer, source_prefix) within the process, so that building
iterators again (e.g. after a restore) does not tokenize the corpus again.

Training order: pairs are shuffled with `seed`, a new permutation every epoch, and batched as
`batching` does for every pipeline. Evaluation: every pair in order; the last global batch is
filled with all-padding rows (example_weight 0), so that metrics such as BLEU cover every pair.
With `bucket_batches`, training batches hold pairs of similar lengths (see `pairs_dataset`), so
that a batch cut to its longest row (`Seq2Seq.fit_length`) is a short step.
The iterators are checkpointable (see `batching.iterate`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import grain
import numpy as np

from jaxlm.data import batching, encoder_decoder, tokenizers

_CACHE_SIZE = 8
_pairs_cache: dict[tuple, tuple[Sequence[tuple[str, str]], tuple]] = {}



def _pairs_identity(pairs: Sequence[tuple[str, str]]) -> tuple:
    """`pairs.key` for a `builders.PairSource` (equal across `get_pairs` calls), else the id."""
    key = getattr(pairs, "key", None)
    return ("key", key) if key else ("id", id(pairs))


def _iter_pairs(pairs: Sequence[tuple[str, str]]) -> Iterator[tuple[str, str]]:
    # A PairSource reads in batches, much faster than one example at a time.
    return pairs.iter_pairs() if hasattr(pairs, "iter_pairs") else iter(pairs)


def _read_only(ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids, np.int32)
    ids.setflags(write=False)
    return ids


def encode_pairs(
    pairs: Sequence[tuple[str, str]], tokenizer: tokenizers.Tokenizer, *, source_prefix: str = ""
) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Returns the (source ids, target ids) of every pair, without EOS, as read-only arrays.

    The source is encoded as `source_prefix + source` (T5: 'translate English to German: ').
    Cached per (pairs, tokenizer.fingerprint, source_prefix) within the process; `pairs` is a
    `builders.PairSource` (cached by its key) or any sequence of (source, target) strings (cached
    by identity, so do not change it in place after encoding it).
    """
    key = (_pairs_identity(pairs), tokenizer.fingerprint, source_prefix)
    if key not in _pairs_cache:
        encoded = tuple(
            (
                _read_only(tokenizer.encode(source_prefix + source)),
                _read_only(tokenizer.encode(target)),
            )
            for source, target in _iter_pairs(pairs)
        )
        if len(_pairs_cache) >= _CACHE_SIZE:
            _pairs_cache.pop(next(iter(_pairs_cache)))
        # Holding `pairs` keeps its id from being reused by another object while cached.
        _pairs_cache[key] = (pairs, encoded)
    return _pairs_cache[key][1]


def _truncate_with_eos(ids: np.ndarray, length: int, eos_id: int) -> np.ndarray:
    return np.concatenate([ids[: length - 1], [eos_id]]).astype(np.int32)


def _pair_rows(
    pairs: Sequence[tuple[str, str]],
    *,
    tokenizer: tokenizers.Tokenizer,
    source_len: int,
    target_len: int,
    eos_id: int,
    pad_id: int,
    decoder_start_id: int | None,
    source_prefix: str,
) -> tuple[int, Callable[[int], dict[str, np.ndarray]]]:
    """Returns (the number of pairs, row): row(i) is pair i as a batch row."""
    if source_len < 2 or target_len < 2:
        raise ValueError(
            f"source_len ({source_len}) and target_len ({target_len}) must be at least 2 (a token"
            " and EOS)."
        )
    encoded = encode_pairs(pairs, tokenizer, source_prefix=source_prefix)
    if not encoded:
        raise ValueError("There are no sentence pairs.")
    layout = encoder_decoder.Layout(source_len, target_len, pad_id, decoder_start_id)

    def row(i: int) -> dict[str, np.ndarray]:
        source, target = encoded[i]
        return layout.example(
            _truncate_with_eos(source, source_len, eos_id),
            _truncate_with_eos(target, target_len, eos_id),
        )

    return len(encoded), row


def pairs_dataset(
    pairs: Sequence[tuple[str, str]],
    *,
    tokenizer: tokenizers.Tokenizer,
    source_len: int,
    target_len: int,
    global_batch_size: int,
    seed: int,
    eos_id: int,
    pad_id: int = 0,
    decoder_start_id: int | None = None,
    source_prefix: str = "",
    bucket_batches: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """Shuffled, repeated, batched sentence pairs for one process (an infinite MapDataset).

    Args:
      pairs: (source, target) strings, e.g. `builders.get_pairs(...)`.
      tokenizer: encodes both sides (a joint vocabulary).
      source_len: encoder length; sources keep at most source_len - 1 tokens, then EOS.
      target_len: decoder length; targets keep at most target_len - 1 tokens, then EOS.
      global_batch_size: rows per step over all processes.
      seed: shuffle seed.
      eos_id: ends sources and targets.
      pad_id: fills padding positions.
      decoder_start_id: the first decoder input (default: pad_id).
      source_prefix: text put before every source (e.g. 'translate English to German: ').
      bucket_batches: > 0: each batch holds pairs of similar lengths (the longer side counts),
        sorted together in windows of this many global batches (`batching.length_bucketed_epochs`).
      process_index: this process.
      process_count: number of processes.

    Returns:
      A MapDataset of batches (see the module docstring).
    """
    batching.per_process_batch_size(global_batch_size, process_index, process_count)
    count, row = _pair_rows(
        pairs,
        tokenizer=tokenizer,
        source_len=source_len,
        target_len=target_len,
        eos_id=eos_id,
        pad_id=pad_id,
        decoder_start_id=decoder_start_id,
        source_prefix=source_prefix,
    )
    if bucket_batches > 0:
        encoded = encode_pairs(pairs, tokenizer, source_prefix=source_prefix)
        lengths = [max(min(len(s) + 1, source_len), min(len(t) + 1, target_len)) for s, t in encoded]
        rows = batching.length_bucketed_epochs(lengths, seed, lambda epoch, i: row(i),
                                               window=bucket_batches * global_batch_size,
                                               batch_size=global_batch_size)
    else:
        rows = batching.shuffled_epochs(count, seed, lambda epoch, i: row(i))
    return batching.per_process_batches(
        rows,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
    )


def pairs_train_iterator(
    *, num_threads: int = 2, prefetch_buffer_size: int = 8, **dataset_kwargs
) -> grain.DatasetIterator:
    """An endless, checkpointable iterator over `pairs_dataset(**dataset_kwargs)` (see
    `batching.iterate`)."""
    return batching.iterate(pairs_dataset(**dataset_kwargs), num_threads, prefetch_buffer_size)


def pairs_eval_batches(
    *,
    pairs: Sequence[tuple[str, str]],
    tokenizer: tokenizers.Tokenizer,
    source_len: int,
    target_len: int,
    global_batch_size: int,
    eos_id: int,
    pad_id: int = 0,
    decoder_start_id: int | None = None,
    source_prefix: str = "",
    max_batches: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> list[dict[str, np.ndarray]]:
    """Returns this process's evaluation batches over every pair, in order.

    Row r of global batch j is pair j * global_batch_size + r; the last global batch is filled up
    with all-padding rows (example_weight 0), so that metrics such as BLEU can cover every pair.
    `max_batches` > 0 keeps only the first global batches. Arguments as in `pairs_dataset`.
    """
    batching.per_process_batch_size(global_batch_size, process_index, process_count)
    count, row = _pair_rows(
        pairs,
        tokenizer=tokenizer,
        source_len=source_len,
        target_len=target_len,
        eos_id=eos_id,
        pad_id=pad_id,
        decoder_start_id=decoder_start_id,
        source_prefix=source_prefix,
    )
    return batching.eval_batches(
        count,
        lambda indices: batching.stack([row(int(i)) for i in indices], encoder_decoder.FEATURES),
        global_batch_size=global_batch_size,
        max_batches=max_batches,
        process_index=process_index,
        process_count=process_count,
        padding=encoder_decoder.Layout(source_len, target_len, pad_id, decoder_start_id).padding(),
    )
