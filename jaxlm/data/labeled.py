"""Fine-tuning data: sentence classification (SST-2, TSV) and token tagging (CoNLL NER).

Public functions:

  classification_source(name, split, *, data_dir='', files='', data_path='')
      -> (list[(text, label_id)], label_names)
  tagging_source(name, split, *, data_dir='', files='', data_path='')
      -> (list[(tokens, tag_ids)], tag_names)
  encode_text(tokenizer, text, seq_len, specials) -> dict[str, np.ndarray]
  encode_words(tokenizer, words, tags, seq_len, specials, case=False) -> dict[str, np.ndarray]
  word_shape(word) -> int   (the case class `case_ids` holds)
  train_iterator(examples, encode, *, global_batch_size, seed, process_index=0,
                 process_count=1, num_threads=2, prefetch_buffer_size=8) -> grain.DatasetIterator
  bucketed_epochs(examples, encode, seed, example, *, bucket_batches, batch_size) -> grain.MapDataset
      (the order of train_iterator's bucketed batches: `example(epoch, i)` of examples i)
  mixed_train_iterator(datasets, weights, *, global_batch_size, seed, process_index=0,
                       process_count=1, num_threads=2,
                       prefetch_buffer_size=8) -> grain.DatasetIterator
  eval_batches(examples, encode, *, batch_size, max_batches=0, process_index=0,
               process_count=1) -> list[dict[str, np.ndarray]]
  fill_values(rows) -> dict[str, np.ndarray]   (what a row lacking a key gets)

An example is a tuple: (text, label_id) or (words, tag_ids). `encode` maps one example to a
dict of numpy arrays, e.g. `lambda e: {**encode_text(tok, e[0], 128, specials), 'label':
np.int32(e[1])}` or `lambda e: encode_words(tok, *e, 128, specials)`, where `specials` is
`mlm.specials_for(tok)[0]`. Rows follow BERT's single-segment layout:

  input_ids    int32[seq_len]  [CLS] pieces [SEP], then the pad id
  segment_ids  int32[seq_len]  zeros
  input_mask   int32[seq_len]  1 on [CLS], the pieces and [SEP], 0 on padding
  tags         int32[seq_len]  (encode_words) a word's tag id at its first piece, -1 elsewhere
  word_count   int32[]         (encode_words) the words that kept their first piece
  case_ids     int32[seq_len]  (encode_words with case=True) each piece's word's `word_shape`,
                               0 on [CLS], [SEP] and padding: the capitalisation an uncased
                               vocabulary loses

-1 (`IGNORE`) marks "no target" in `label` and `tags`: the losses and metrics skip it.

Training order: examples are shuffled with `seed`, a new permutation every epoch, repeated
forever and batched into global batches; process p of P gets rows p*b..(p+1)*b of every global
batch (b = global_batch_size // P), so the global batches do not depend on the process count.
Evaluation pads the last global batch with rows that `eval_batches` describes (see
`batching`). The iterators are checkpointable (see `batching.iterate`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from jaxlm.data import batching, builders, mlm, progress, readers, tokenizers

IGNORE = -1  # The label / tag of positions and rows without a target.
LABEL_KEYS = ("label", "tags")  # Filled with IGNORE where a row lacks them; other keys with 0.

Example = tuple[Any, Any]
Encode = Callable[[Example], dict[str, np.ndarray]]


def _builder(name: str, kinds: Sequence[str], data_dir: str, files: str) -> Any:
    if name not in kinds:
        raise ValueError(f"{name!r} is not one of the data sets {', '.join(kinds)}.")
    builders.check_files(name, files)
    return builders.get_builder(name, data_dir=data_dir, files=files)


def _examples(builder: Any, split: str) -> list[dict[str, Any]]:
    """Every example of `split`, decoded by TFDS (text as bytes)."""
    builders.check_split(builder.name, split, builder)
    source = builder.as_data_source(split=split)
    return source.__getitems__(list(range(len(source))))


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def classification_source(
    name: str, split: str, *, data_dir: str = "", files: str = "", data_path: str = ""
) -> tuple[list[tuple[str, int]], list[str]]:
    """Returns the (text, label id) examples of `split` and the label names.

    Args:
      name: `jaxlm_sst2` or `jaxlm_tsv`.
      split: e.g. 'train' or 'validation' (TFDS slicing works); unused with `data_path`.
      data_dir: where prepared data lives (see `builders.get_source`).
      files: for `jaxlm_tsv`, 'train=PATH,validation=PATH'.
      data_path: a TSV file (see `readers.read_tsv`) read instead of the split, its labels
        mapped with `name`'s label names (a name, or an integer id).
    """
    builder = _builder(name, builders.CLASSIFICATION_BUILDERS, data_dir, files)
    names = list(builder.info.features["label"].names)
    if data_path:
        texts, labels = readers.read_tsv(data_path)
        return list(zip(texts, readers.label_ids(labels, names, data_path))), names
    return [(_text(e["text"]), int(e["label"])) for e in _examples(builder, split)], names


def tagging_source(
    name: str, split: str, *, data_dir: str = "", files: str = "", data_path: str = ""
) -> tuple[list[tuple[list[str], list[int]]], list[str]]:
    """Returns the (tokens, tag ids) sentences of `split` and the tag names.

    Args:
      name: `jaxlm_conll2003` or `jaxlm_conll`.
      split: e.g. 'train' or 'validation' (TFDS slicing works); unused with `data_path`.
      data_dir: where prepared data lives (see `builders.get_source`).
      files: for `jaxlm_conll`, 'train=PATH,validation=PATH'.
      data_path: a CoNLL file (see `readers.read_conll`) read instead of the split, its tags
        mapped with `name`'s tag names.
    """
    builder = _builder(name, builders.TAGGING_BUILDERS, data_dir, files)
    names = list(builder.info.features["tags"].feature.names)
    if data_path:
        return [
            (tokens, readers.label_ids(tags, names, data_path, integers=False))
            for tokens, tags in readers.read_conll(data_path)
        ], names
    return [
        ([_text(t) for t in e["tokens"]], [int(t) for t in e["tags"]])
        for e in _examples(builder, split)
    ], names


def _check_seq_len(seq_len: int) -> None:
    if seq_len < 3:
        raise ValueError(f"seq_len must be at least 3 ([CLS], a piece, [SEP]); got {seq_len}.")


def _layout(ids: Sequence[int], seq_len: int, pad: int) -> dict[str, np.ndarray]:
    """[CLS] ... [SEP] ids padded to seq_len, with their segment ids and mask."""
    input_ids = np.full(seq_len, pad, np.int32)
    input_ids[: len(ids)] = ids
    return {
        "input_ids": input_ids,
        "segment_ids": np.zeros(seq_len, np.int32),
        "input_mask": (np.arange(seq_len) < len(ids)).astype(np.int32),
    }


def encode_text(
    tokenizer: tokenizers.Tokenizer, text: str, seq_len: int, specials: mlm.Specials
) -> dict[str, np.ndarray]:
    """[CLS] text [SEP] as `input_ids`, `segment_ids`, `input_mask` (see the module docstring).

    Pieces past seq_len - 2 are cut. `specials` is `mlm.specials_for(tokenizer)[0]`.
    """
    _check_seq_len(seq_len)
    pieces = tokenizer.encode(text)[: seq_len - 2].tolist()
    return _layout([specials.cls, *pieces, specials.sep], seq_len, specials.pad)


CASE_SHAPES = 5  # word_shape's classes, 0 (no word) included


def word_shape(word: str) -> int:
    """The word's capitalisation: 1 lower-case ("the"), 2 capitalised ("Paris", "McDonald"),
    3 all capitals ("EU", "U.S."), 4 no letters ("1996", ",")."""
    if not any(c.isalpha() for c in word):
        return 4
    if word.isupper():
        return 3
    return 2 if word[0].isupper() else 1


def encode_words(
    tokenizer: tokenizers.Tokenizer,
    words: Sequence[str],
    tags: Sequence[int],
    seq_len: int,
    specials: mlm.Specials,
    case: bool = False,
) -> dict[str, np.ndarray]:
    """[CLS] word pieces [SEP] with each word's tag at its first piece (see the module docstring).

    Each word is tokenized on its own, so pieces never straddle words; a word without pieces
    (e.g. only control characters) gets the [UNK] id (the pad id for tokenizers without one), so
    that every word has a position for its tag. Pieces past seq_len - 2 are cut, as Hugging Face
    truncation does: the words that lost their first piece are dropped and `word_count` says how
    many words remain (their predictions are the first word_count words' tags).

    Args:
      tokenizer: splits each word into pieces.
      words: the sentence's words.
      tags: one tag id per word (e.g. zeros at prediction time).
      seq_len: positions per row, [CLS], [SEP] and padding included.
      specials: `mlm.specials_for(tokenizer)[0]`.
      case: also `case_ids`, each piece's word's `word_shape`.
    """
    _check_seq_len(seq_len)
    if len(words) != len(tags):
        raise ValueError(f"{len(words)} words but {len(tags)} tags; give one tag per word.")
    unk = specials.pad if tokenizer.unk_id is None else tokenizer.unk_id
    ids, labels, shapes = [specials.cls], [IGNORE], [0]
    word_count = 0
    for word, tag in zip(words, tags):
        room = seq_len - 1 - len(ids)  # Keep the last position for [SEP].
        if room <= 0:
            break
        pieces = (tokenizer.encode(word).tolist() or [unk])[:room]
        ids += pieces
        labels += [tag] + [IGNORE] * (len(pieces) - 1)
        shapes += [word_shape(word)] * len(pieces)
        word_count += 1
    ids.append(specials.sep)
    row = _layout(ids, seq_len, specials.pad)
    row["tags"] = np.full(seq_len, IGNORE, np.int32)
    row["tags"][: len(labels)] = labels
    row["word_count"] = np.int32(word_count)
    if case:
        row["case_ids"] = np.zeros(seq_len, np.int32)
        row["case_ids"][: len(shapes)] = shapes
    return row


def _epochs(examples: Sequence[Example], encode: Encode, seed: int, bucket_batches: int = 0,
            batch_size: int = 0) -> grain.MapDataset:
    """Encoded examples, a new permutation every epoch (shuffle before repeat), forever; with
    `bucket_batches` each batch of `batch_size` holds examples of similar lengths (real tokens,
    `input_mask`), sorted together in windows of that many batches."""
    if not len(examples):
        raise ValueError("There are no examples to train on.")
    example = lambda epoch, i: encode(examples[i])
    if bucket_batches <= 0:
        return batching.shuffled_epochs(len(examples), seed, example)
    return bucketed_epochs(examples, encode, seed, example, bucket_batches=bucket_batches, batch_size=batch_size)


def bucketed_epochs(examples: Sequence[Example], encode: Encode, seed: int, example: Callable[[int, int], Any], *,
                    bucket_batches: int, batch_size: int) -> grain.MapDataset:
    """`batching.length_bucketed_epochs` of `example(epoch, i)` by the examples' real tokens
    (`input_mask` of `encode`), sorted together in windows of `bucket_batches` batches."""
    counted = progress.progress(examples, desc="lengths for bucketing", unit="example")
    lengths = [int(encode(e)["input_mask"].sum()) for e in counted]
    return batching.length_bucketed_epochs(lengths, seed, example, window=bucket_batches * batch_size,
                                           batch_size=batch_size)


def train_iterator(
    examples: Sequence[Example],
    encode: Encode,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 2,
    prefetch_buffer_size: int = 8,
    bucket_batches: int = 0,
) -> grain.DatasetIterator:
    """Returns an endless, checkpointable iterator of this process's training batches.

    Args:
      examples: e.g. from `classification_source` or `tagging_source`.
      encode: one example -> dict of arrays (see the module docstring).
      global_batch_size: rows per step over all processes.
      seed: shuffle seed.
      process_index: `jax.process_index()`.
      process_count: `jax.process_count()`.
      num_threads: Grain reader threads.
      prefetch_buffer_size: batches read ahead.
      bucket_batches: > 0: each global batch holds examples of similar lengths, sorted together
        in windows of this many global batches (`batching.length_bucketed_epochs`), so that a
        batch cut to its longest row is a short step; every example still comes once an epoch.

    Returns:
      Batches of global_batch_size // process_count rows; `get_state()` / `set_state()` save
      and restore the position (restore into an iterator built with the same arguments).
    """
    ds = batching.per_process_batches(
        _epochs(examples, encode, seed, bucket_batches, global_batch_size),
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
    )
    return batching.iterate(ds, num_threads, prefetch_buffer_size)


def fill_values(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The value of each key of `rows` for a row that lacks it: IGNORE for `LABEL_KEYS`, else 0,
    in the shape and dtype the rows give it.

    Raises:
      ValueError: naming the key, when two rows give a key different shapes or dtypes.
    """
    fill: dict[str, np.ndarray] = {}
    for row in rows:
        for key, value in row.items():
            value = np.asarray(value)
            if key in fill and (fill[key].shape, fill[key].dtype) != (value.shape, value.dtype):
                raise ValueError(
                    f"The tasks encode {key!r} differently: {fill[key].dtype}"
                    f"{list(fill[key].shape)} and {value.dtype}{list(value.shape)}; give it one"
                    " shape and dtype."
                )
            fill[key] = np.full(value.shape, IGNORE if key in LABEL_KEYS else 0, value.dtype)
    return fill


def _task_seed(seed: int, task: int) -> int:
    """A shuffle seed per task, so that tasks of equal size are not shuffled alike."""
    return int(np.random.SeedSequence([seed, task]).generate_state(1)[0])


def mixed_train_iterator(
    datasets: Sequence[tuple[Sequence[Example], Encode]],
    weights: Sequence[float],
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 2,
    prefetch_buffer_size: int = 8,
) -> grain.DatasetIterator:
    """Returns an endless, checkpointable iterator of multi-task batches.

    Row positions are dealt to the tasks by `grain.MapDataset.mix`: a fixed, evenly spread
    interleave in which task i holds weights[i] / sum(weights) of the rows, so a row comes from
    task i with that probability, without the variance of a random draw (every global batch has
    about the same share of each task). Each task's examples are shuffled and repeated on their
    own, so a small task repeats more often.

    Every row has the keys of all tasks plus `task_id` int32 (the task's index in `datasets`):
    a key that a task's `encode` does not give is filled with IGNORE (-1) for `label` and
    `tags` and 0 otherwise, in the shape and dtype of the task that gives it (read from the
    encoding of each task's first example). A key that two tasks give must have one shape and
    dtype in both (e.g. the same seq_len).

    Args:
      datasets: (examples, encode) per task, as for `train_iterator`.
      weights: one positive weight per task.
      global_batch_size, seed, process_index, process_count, num_threads,
        prefetch_buffer_size: as in `train_iterator`.
    """
    if len(weights) != len(datasets) or not datasets or min(weights) <= 0:
        raise ValueError(
            f"Give one positive weight per dataset: {len(datasets)} datasets, weights {weights}."
        )
    for examples, _ in datasets:
        if not len(examples):
            raise ValueError("A dataset has no examples to train on.")
    fill = fill_values([encode(examples[0]) for examples, encode in datasets])
    if "task_id" in fill:
        raise ValueError("`encode` must not give 'task_id'; the mixture adds it.")

    def tagged(encode: Encode, task: int) -> Encode:
        return lambda example: {**fill, **encode(example), "task_id": np.int32(task)}

    parts = [
        _epochs(examples, tagged(encode, task), _task_seed(seed, task))
        for task, (examples, encode) in enumerate(datasets)
    ]
    ds = batching.per_process_batches(
        grain.MapDataset.mix(parts, list(weights)),
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
    )
    return batching.iterate(ds, num_threads, prefetch_buffer_size)


def eval_batches(
    examples: Sequence[Example],
    encode: Encode,
    *,
    batch_size: int,
    max_batches: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> list[dict[str, np.ndarray]]:
    """Returns this process's evaluation batches over every example, in order.

    Row r of global batch j is example j * batch_size + r, with its position in `index` int32;
    the last global batch is filled up with padding rows (`index`, `label`, `tags` IGNORE,
    every other key 0, so `input_mask` is all 0). `max_batches` > 0 keeps only the first
    global batches. Rows are split between processes as in `train_iterator` (batch_size is the
    global batch size).
    """
    batching.per_process_batch_size(batch_size, process_index, process_count)
    if not len(examples):
        raise ValueError("There are no examples to evaluate.")
    padding = {**fill_values([encode(examples[0])]), "index": np.int32(IGNORE)}
    return batching.eval_batches(
        len(examples),
        lambda rows: batching.stack(
            [{**encode(examples[int(i)]), "index": np.int32(i)} for i in rows], padding
        ),
        global_batch_size=batch_size,
        max_batches=max_batches,
        process_index=process_index,
        process_count=process_count,
        padding=padding,
    )
