"""T5 span corruption: a token stream -> windows -> corrupted (inputs, targets) -> batches.

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

Batches are the encoder-decoder rows of `encoder_decoder` (never an all-padding row).

Span corruption follows T5 (Raffel et al. 2019, `span_corruption` in
t5/data/preprocessors.py): a token stream (`lm.token_stream`) is cut into windows of
`tokens_length` tokens (see `span_corruption_lengths`), about `noise_density` of each window is
chosen as noise in spans of mean length `mean_noise_span_length`, the inputs keep the other
tokens with one sentinel per noise span, and the targets are the noise spans, each after its
sentinel. Sentinel k is `vocab_size - 1 - k` (T5's `<extra_id_k>`), so `vocab_size` is the
model's vocabulary: the tokenizer's ids plus room for the sentinels above them (T5 adds 100).

Training order: windows are shuffled with `seed`, a new permutation every epoch, and batched as
`batching` does for every pipeline; each epoch draws new noise for every window. Evaluation:
windows in order with epoch 0's noise; the windows that do not fill a last global batch are
dropped. The iterators are checkpointable (see `batching.iterate`).
"""

from __future__ import annotations

from collections.abc import Callable

import grain
import numpy as np

from jaxlm.data import batching, encoder_decoder, lm



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
    what: str,
) -> tuple[int, Callable[[int, int], dict[str, np.ndarray]]]:
    """Returns (the number of windows, row): row(epoch, j) is window j with epoch's noise.

    Raises ValueError (naming the tokens as `what`) unless one global batch of windows fits and
    the token ids stay below the sentinels.
    """
    tokens_length, targets_length = span_corruption_lengths(
        inputs_length, noise_density, mean_noise_span_length
    )
    windows = lm.pack(tokens, tokens_length - 1)  # Windows of tokens_length tokens.
    if len(windows) < global_batch_size:
        raise ValueError(
            f"{what} ({len(tokens)} tokens) has {len(windows)} windows of"
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
    layout = encoder_decoder.Layout(inputs_length, targets_length, pad_id, decoder_start_id)

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
    what: str = "The token stream",
) -> grain.MapDataset:
    """Shuffled, repeated, span-corrupted batches of `tokens` for one process (infinite).

    The stream is cut into windows of `span_corruption_lengths(inputs_length, ...)[0]` tokens
    (the tail is dropped); the windows are shuffled anew every epoch, and window j of epoch e is
    corrupted with `np.random.default_rng([seed, e, j])`, so each epoch draws new noise. Every
    row's inputs have exactly `inputs_length` tokens except in rare rounding cases (then padded).

    Args:
      tokens: one token stream (see `lm.token_stream`).
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
      what: the tokens in errors, e.g. "Split 'validation' of jaxlm_tiny_shakespeare".

    Returns:
      A MapDataset of batches (see the module docstring); targets have length
      `span_corruption_lengths(...)[1]`.
    """
    batching.per_process_batch_size(global_batch_size, process_index, process_count)
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
        what=what,
    )
    return batching.per_process_batches(
        batching.shuffled_epochs(count, seed, row),
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
    )


def span_corruption_train_iterator(
    *, num_threads: int = 2, prefetch_buffer_size: int = 8, **dataset_kwargs
) -> grain.DatasetIterator:
    """An endless, checkpointable iterator over `span_corruption_dataset(**dataset_kwargs)`
    (see `batching.iterate`)."""
    return batching.iterate(
        span_corruption_dataset(**dataset_kwargs), num_threads, prefetch_buffer_size
    )


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
    what: str = "The token stream",
) -> list[dict[str, np.ndarray]]:
    """Returns the first `max_batches` (<= 0: all) span-corruption evaluation batches.

    Windows in order, window j corrupted with `np.random.default_rng([seed, 0, j])`: the same
    batches every call. The windows that do not fill a last global batch are dropped; rows are
    split between processes as in `span_corruption_dataset`.
    """
    batching.per_process_batch_size(global_batch_size, process_index, process_count)
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
        what=what,
    )
    return batching.eval_batches(
        count,
        lambda indices: batching.stack([row(0, int(j)) for j in indices]),
        global_batch_size=global_batch_size,
        max_batches=max_batches,
        process_index=process_index,
        process_count=process_count,
    )
