"""Encoder-decoder (T5-style) input pipelines: span corruption and parallel text.

Public functions:

  random_spans_noise_mask(length, noise_density, mean_noise_span_length, rng) -> np.ndarray
  span_corruption(tokens, rng, *, vocab_size, eos_id, noise_density=0.15,
                  mean_noise_span_length=3.0) -> (inputs, targets)
  span_corruption_lengths(inputs_length, noise_density=0.15,
                          mean_noise_span_length=3.0) -> (tokens_length, targets_length)
  span_corruption_dataset(tokens, *, inputs_length, global_batch_size, seed, vocab_size, eos_id,
                          ...) -> grain.MapDataset
  span_corruption_train_iterator(*, num_threads=2, prefetch_buffer_size=8,
                                 **span_corruption_dataset_kwargs) -> grain.DatasetIterator
  span_corruption_eval_batches(tokens, *, inputs_length, global_batch_size, seed, vocab_size,
                               eos_id, max_batches=0, ...) -> list[dict[str, np.ndarray]]
  encode_pairs(pairs, tokenizer, *, source_prefix='') -> tuple[(source_ids, target_ids), ...]
  pairs_dataset(pairs, *, tokenizer, source_len, target_len, global_batch_size, seed, eos_id,
                ...) -> grain.MapDataset
  pairs_train_iterator(*, num_threads=2, prefetch_buffer_size=8,
                       **pairs_dataset_kwargs) -> grain.DatasetIterator
  pairs_eval_batches(*, pairs, tokenizer, source_len, target_len, global_batch_size, eos_id,
                     max_batches=0, ...) -> list[dict[str, np.ndarray]]

A batch is a dict of numpy arrays with b = global_batch_size // process_count rows:

  encoder_input_tokens   int32[b, Li]    the inputs, ending in EOS, then padding
  decoder_target_tokens  int32[b, Lt]    the targets, ending in EOS, then padding
  decoder_input_tokens   int32[b, Lt]    decoder_target_tokens shifted right by one, position 0
                                         `decoder_start_id` (default: pad_id, as in T5)
  decoder_loss_weights   float32[b, Lt]  1.0 on the real target tokens (EOS included), else 0.0
  example_weight         float32[b]      1.0 for a real example, 0.0 for an all-padding row

Padding positions hold `pad_id` (default 0, the jaxlm sentencepiece pad id). Only the last
evaluation batch of `pairs_eval_batches` has all-padding rows.

Span corruption follows T5 (Raffel et al. 2019, `span_corruption` in
t5/data/preprocessors.py): a token stream is cut into windows of `tokens_length` tokens (see
`span_corruption_lengths`), about `noise_density` of each window is chosen as noise in spans of
mean length `mean_noise_span_length`, the inputs keep the other tokens with one sentinel per noise
span, and the targets are the noise spans, each after its sentinel. Sentinel k is
`vocab_size - 1 - k` (T5's `<extra_id_k>`), so `vocab_size` is the model's vocabulary: the
tokenizer's ids plus room for the sentinels above them (T5 adds 100).

Parallel text: each (source, target) pair is one example; sources keep at most source_len - 1
tokens and targets target_len - 1, then EOS. Encodings are cached per (pairs, tokenizer,
source_prefix) within the process, so that building iterators again (e.g. after a restore) does
not tokenize the corpus again.

Training order (both kinds): examples are shuffled with `seed`, a new permutation every epoch,
and batched into global batches; process p of P gets rows p*b..(p+1)*b of every global batch, so
the global batches do not depend on the process count. Span corruption draws new noise for every
window in every epoch. The iterators are checkpointable like `pipeline.train_iterator`'s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence

import grain
import numpy as np

from jaxlm.data import pipeline, tokenizers

FEATURES = (
    "encoder_input_tokens",
    "decoder_target_tokens",
    "decoder_input_tokens",
    "decoder_loss_weights",
    "example_weight",
)
_CACHE_SIZE = 8
_pairs_cache: dict[tuple, tuple[Sequence[tuple[str, str]], tuple]] = {}


# Span corruption.


def _noise_counts(
    length: int, noise_density: float, mean_noise_span_length: float
) -> tuple[int, int]:
    """T5's (num_noise_tokens, num_noise_spans) for a window of `length` tokens.

    In float32 and rounding half to even, as T5's TensorFlow code computes them; at least one
    noise and one non-noise token (length is taken as at least 2) and at least one noise span.
    """
    length = max(length, 2)
    num_noise = int(np.round(np.float32(length) * np.float32(noise_density)))
    num_noise = min(max(num_noise, 1), length - 1)
    num_spans = int(np.round(np.float32(num_noise) / np.float32(mean_noise_span_length)))
    return num_noise, max(num_spans, 1)


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Splits `num_items` items into `num_segments` non-empty runs, all splits equally likely.

    Returns the run lengths (positive, summing to num_items).
    """
    if not 1 <= num_segments <= num_items:
        raise ValueError(f"Cannot split {num_items} tokens into {num_segments} non-empty spans.")
    starts_segment = np.zeros(num_items, np.int64)  # 1 where a segment other than the first starts
    starts_segment[1:] = rng.permutation(np.arange(num_items - 1) < num_segments - 1)
    return np.bincount(np.cumsum(starts_segment), minlength=num_segments)


def random_spans_noise_mask(
    length: int, noise_density: float, mean_noise_span_length: float, rng: np.random.Generator
) -> np.ndarray:
    """T5's noise mask of random spans: bool[length], True at noise tokens.

    num_noise_tokens = round(length * noise_density), clipped to [1, length - 1], and
    num_noise_spans = max(1, round(num_noise_tokens / mean_noise_span_length)); the noise tokens
    and the non-noise tokens are each split at random into that many non-empty spans, which then
    alternate, non-noise first (so the mask always ends in noise). Subject to these counts all
    masks are equally likely. A length below 2 is computed as 2 and cut back, as in T5.

    Args:
      length: number of tokens.
      noise_density: about this fraction of the tokens is noise.
      mean_noise_span_length: the mean length of a noise span.
      rng: the random generator.

    Returns:
      The mask.
    """
    if noise_density == 0:
        return np.zeros(length, bool)
    num_noise, num_spans = _noise_counts(length, noise_density, mean_noise_span_length)
    padded_length = max(length, 2)
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)
    nonnoise_lengths = _random_segmentation(padded_length - num_noise, num_spans, rng)
    span_lengths = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)
    is_noise_span = np.arange(2 * num_spans) % 2 == 1
    return np.repeat(is_noise_span, span_lengths)[:length]


def _spans_to_sentinels(tokens: np.ndarray, mask: np.ndarray, vocab_size: int) -> np.ndarray:
    """Replaces the k-th run of masked tokens (k = 0, 1, ...) by the one id vocab_size - 1 - k."""
    after_masked = np.zeros_like(mask)
    after_masked[1:] = mask[:-1]
    first = mask & ~after_masked
    replaced = np.where(first, vocab_size - np.cumsum(first), tokens)
    return replaced[~(mask & after_masked)].astype(np.int32)


def span_corruption(
    tokens: np.ndarray,
    rng: np.random.Generator,
    *,
    vocab_size: int,
    eos_id: int,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
) -> tuple[np.ndarray, np.ndarray]:
    """T5's span corruption of one window of tokens.

    With the mask of `random_spans_noise_mask`, the inputs are the tokens with each noise span
    replaced by one sentinel, and the targets are the noise spans, each after its sentinel:

      tokens  a b c d e f g     (noise: c d, g)
      inputs  a b <s0> e f <s1> EOS
      targets <s0> c d <s1> g EOS

    where <sk> = vocab_size - 1 - k.

    Args:
      tokens: int[n], the window.
      rng: draws the noise mask.
      vocab_size: the model's vocabulary size; the sentinels are its last ids.
      eos_id: appended to both inputs and targets.
      noise_density: see `random_spans_noise_mask`.
      mean_noise_span_length: see `random_spans_noise_mask`.

    Returns:
      (inputs, targets) as int32 arrays.
    """
    tokens = np.asarray(tokens, np.int32)
    mask = random_spans_noise_mask(len(tokens), noise_density, mean_noise_span_length, rng)
    eos = np.array([eos_id], np.int32)
    inputs = np.concatenate([_spans_to_sentinels(tokens, mask, vocab_size), eos])
    targets = np.concatenate([_spans_to_sentinels(tokens, ~mask, vocab_size), eos])
    return inputs, targets


def span_corruption_lengths(
    inputs_length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0
) -> tuple[int, int]:
    """T5's `random_spans_helper`: the window length that fills `inputs_length`, and the targets'.

    tokens_length is the largest window whose corrupted inputs, EOS included, have at most
    inputs_length tokens (usually exactly: 512 -> 568 tokens, 114 targets); targets_length is the
    length of its targets, EOS included. Like T5, for noise_density 0.5 the window is shortened by
    one when the targets would otherwise be longer than the inputs. The counts are those of
    `random_spans_noise_mask` (float32 rounding), so every window gives exactly these lengths.

    Args:
      inputs_length: the encoder's sequence length.
      noise_density: see `random_spans_noise_mask`; in (0, 1).
      mean_noise_span_length: see `random_spans_noise_mask`; at least 1.

    Returns:
      (tokens_length, targets_length).
    """
    if not 0 < noise_density < 1 or mean_noise_span_length < 1 or inputs_length < 2:
        raise ValueError(
            "Span corruption needs 0 < noise_density < 1, mean_noise_span_length >= 1 and"
            f" inputs_length >= 2; got {noise_density}, {mean_noise_span_length}, {inputs_length}."
        )

    def corrupted_lengths(tokens_length: int) -> tuple[int, int]:
        num_noise, num_spans = _noise_counts(tokens_length, noise_density, mean_noise_span_length)
        return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1

    tokens_length = inputs_length - 1
    while corrupted_lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    targets_length = corrupted_lengths(tokens_length)[1]
    if noise_density == 0.5 and targets_length > inputs_length:
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Pads (inputs, targets) into the features of one batch row."""

    inputs_length: int
    targets_length: int
    pad_id: int = 0
    decoder_start_id: int | None = None

    def _padded(self, ids: np.ndarray, length: int, what: str) -> np.ndarray:
        if len(ids) > length:
            raise ValueError(f"{what} has {len(ids)} tokens, more than its length {length}.")
        padded = np.full(length, self.pad_id, np.int32)
        padded[: len(ids)] = ids
        return padded

    def example(self, inputs: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
        decoder_target = self._padded(targets, self.targets_length, "A target")
        start = self.pad_id if self.decoder_start_id is None else self.decoder_start_id
        return {
            "encoder_input_tokens": self._padded(inputs, self.inputs_length, "An input"),
            "decoder_target_tokens": decoder_target,
            "decoder_input_tokens": np.concatenate([[start], decoder_target[:-1]]).astype(np.int32),
            "decoder_loss_weights": (np.arange(self.targets_length) < len(targets)).astype(
                np.float32
            ),
            "example_weight": np.float32(1.0),
        }

    def padding(self) -> dict[str, np.ndarray]:
        """An all-padding row: pad ids, zero loss weights and example_weight 0."""
        return {
            "encoder_input_tokens": np.full(self.inputs_length, self.pad_id, np.int32),
            "decoder_target_tokens": np.full(self.targets_length, self.pad_id, np.int32),
            "decoder_input_tokens": np.full(self.targets_length, self.pad_id, np.int32),
            "decoder_loss_weights": np.zeros(self.targets_length, np.float32),
            "example_weight": np.float32(0.0),
        }


def _stack(examples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.stack([e[key] for e in examples]) for key in FEATURES}


def _span_rows(
    tokens: np.ndarray,
    *,
    inputs_length: int,
    global_batch_size: int,
    seed: int,
    vocab_size: int,
    eos_id: int,
    noise_density: float,
    mean_noise_span_length: float,
    pad_id: int,
    decoder_start_id: int | None,
) -> tuple[int, Callable[[int, int], dict[str, np.ndarray]]]:
    """Returns (the number of windows, row): row(epoch, j) is window j with epoch's noise.

    Raises ValueError unless one global batch of windows fits and the token ids stay below the
    sentinels.
    """
    tokens_length, targets_length = span_corruption_lengths(
        inputs_length, noise_density, mean_noise_span_length
    )
    windows = pipeline.pack(tokens, tokens_length - 1)  # Windows of tokens_length tokens.
    if len(windows) < global_batch_size:
        raise ValueError(
            f"The token stream ({len(tokens)} tokens) has {len(windows)} windows of"
            f" {tokens_length} tokens (for inputs_length {inputs_length}), fewer than one global"
            f" batch of {global_batch_size}; lower inputs_length or global_batch_size."
        )
    num_sentinels = _noise_counts(tokens_length, noise_density, mean_noise_span_length)[1]
    if int(np.max(tokens)) >= vocab_size - num_sentinels:
        raise ValueError(
            f"Token id {int(np.max(tokens))} collides with the {num_sentinels} sentinels"
            f" {vocab_size - num_sentinels}..{vocab_size - 1}; vocab_size must leave room for the"
            " sentinels above the tokenizer's ids (T5 adds 100)."
        )
    layout = _Layout(inputs_length, targets_length, pad_id, decoder_start_id)

    def row(epoch: int, j: int) -> dict[str, np.ndarray]:
        inputs, targets = span_corruption(
            windows[j],
            np.random.default_rng([seed, epoch, j]),
            vocab_size=vocab_size,
            eos_id=eos_id,
            noise_density=noise_density,
            mean_noise_span_length=mean_noise_span_length,
        )
        return layout.example(inputs, targets)

    return len(windows), row


def span_corruption_dataset(
    tokens: np.ndarray,
    *,
    inputs_length: int,
    global_batch_size: int,
    seed: int,
    vocab_size: int,
    eos_id: int,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    pad_id: int = 0,
    decoder_start_id: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """Shuffled, repeated, span-corrupted batches of `tokens` for one process (infinite).

    The stream is cut into windows of `span_corruption_lengths(inputs_length, ...)[0]` tokens
    (the tail is dropped); the windows are shuffled anew every epoch, and window j of epoch e is
    corrupted with `np.random.default_rng([seed, e, j])`, so each epoch draws new noise. Every
    row's inputs have exactly `inputs_length` tokens except in rare rounding cases (then padded).

    Args:
      tokens: one token stream (see `pipeline.token_stream`).
      inputs_length: the encoder's sequence length.
      global_batch_size: rows per step over all processes.
      seed: shuffle and noise seed (0 <= seed < 2**32).
      vocab_size: the model's vocabulary size (sentinels are its last ids).
      eos_id: ends inputs and targets.
      noise_density: see `random_spans_noise_mask`.
      mean_noise_span_length: see `random_spans_noise_mask`.
      pad_id: fills padding positions.
      decoder_start_id: the first decoder input (default: pad_id).
      process_index: this process.
      process_count: number of processes.

    Returns:
      A MapDataset of batches (see the module docstring); targets have length
      `span_corruption_lengths(...)[1]`.
    """
    b = pipeline._per_process_batch_size(global_batch_size, process_index, process_count)
    count, row = _span_rows(
        tokens,
        inputs_length=inputs_length,
        global_batch_size=global_batch_size,
        seed=seed,
        vocab_size=vocab_size,
        eos_id=eos_id,
        noise_density=noise_density,
        mean_noise_span_length=mean_noise_span_length,
        pad_id=pad_id,
        decoder_start_id=decoder_start_id,
    )
    ds = grain.MapDataset.range(count).shuffle(seed=seed).repeat()
    ds = ds.map_with_index(lambda index, j: row(index // count, int(j)))
    return ds.batch(b, drop_remainder=True)[process_index::process_count]


def span_corruption_train_iterator(
    *, num_threads: int = 2, prefetch_buffer_size: int = 8, **dataset_kwargs
) -> grain.DatasetIterator:
    """An endless, checkpointable iterator over `span_corruption_dataset(**dataset_kwargs)`
    (see `pipeline.iterate`)."""
    return pipeline.iterate(span_corruption_dataset(**dataset_kwargs), num_threads,
                            prefetch_buffer_size)


def span_corruption_eval_batches(
    tokens: np.ndarray,
    *,
    inputs_length: int,
    global_batch_size: int,
    seed: int,
    vocab_size: int,
    eos_id: int,
    max_batches: int = 0,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    pad_id: int = 0,
    decoder_start_id: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> list[dict[str, np.ndarray]]:
    """Returns the first `max_batches` (<= 0: all) span-corruption evaluation batches.

    Windows in order, window j corrupted with `np.random.default_rng([seed, 0, j])`: the same
    batches every call. The windows that do not fill a last global batch are dropped; rows are
    split between processes as in `span_corruption_dataset`.
    """
    b = pipeline._per_process_batch_size(global_batch_size, process_index, process_count)
    count, row = _span_rows(
        tokens,
        inputs_length=inputs_length,
        global_batch_size=global_batch_size,
        seed=seed,
        vocab_size=vocab_size,
        eos_id=eos_id,
        noise_density=noise_density,
        mean_noise_span_length=mean_noise_span_length,
        pad_id=pad_id,
        decoder_start_id=decoder_start_id,
    )
    num_batches = count // global_batch_size
    if max_batches > 0:
        num_batches = min(num_batches, max_batches)
    batches = []
    for batch in range(num_batches):
        first = batch * global_batch_size + process_index * b
        batches.append(_stack([row(0, j) for j in range(first, first + b)]))
    return batches


# Parallel text.


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
    layout = _Layout(source_len, target_len, pad_id, decoder_start_id)

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
      process_index: this process.
      process_count: number of processes.

    Returns:
      A MapDataset of batches (see the module docstring).
    """
    b = pipeline._per_process_batch_size(global_batch_size, process_index, process_count)
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
    ds = grain.MapDataset.range(count).shuffle(seed=seed).repeat().map(row)
    return ds.batch(b, drop_remainder=True)[process_index::process_count]


def pairs_train_iterator(
    *, num_threads: int = 2, prefetch_buffer_size: int = 8, **dataset_kwargs
) -> grain.DatasetIterator:
    """An endless, checkpointable iterator over `pairs_dataset(**dataset_kwargs)` (see
    `pipeline.iterate`)."""
    return pipeline.iterate(pairs_dataset(**dataset_kwargs), num_threads, prefetch_buffer_size)


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
    b = pipeline._per_process_batch_size(global_batch_size, process_index, process_count)
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
    padding = _Layout(source_len, target_len, pad_id, decoder_start_id).padding()
    num_batches = -(-count // global_batch_size)
    if max_batches > 0:
        num_batches = min(num_batches, max_batches)
    batches = []
    for batch in range(num_batches):
        first = batch * global_batch_size + process_index * b
        rows = [row(i) if i < count else padding for i in range(first, first + b)]
        batches.append(_stack(rows))
    return batches
