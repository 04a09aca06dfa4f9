"""Token corpora prepared once into ArrayRecord shards of windows, read with random access.

For corpora that do not fit the in-memory path of `lm` (which tokenizes every document of a
split in every process at start-up). `tools/prepare_data.py` tokenizes a split once:

  prepare(output, units, *, tokenizer_dir, seq_len, workers=N, shard_bytes=...)  # DIR/SPLIT/

and a run with `data.prepared=DIR` reads it:

  Corpus(DIR, split)                      # len, window(i), windows(rows), manifest
  check_tokenizer(corpus, tokenizer)      # a corpus of another tokenizer is an error
  train_dataset(corpus, ...) / eval_batches(corpus, ...)

The windows are exactly those of the in-memory path (`lm.pack(lm.token_stream(...))`): the
documents of the split in order, the tokenizer's EOS between documents, cut into consecutive
windows of seq_len + 1 tokens, the tail that fills no window dropped. Each window is one
ArrayRecord record (its tokens as little-endian uint16, or int32 for vocabularies over 65,536);
shards hold `shard_bytes` of windows each. `manifest.json` beside the shards records the
tokenizer (kind, fingerprint), seq_len, dtype, the counts and each shard's windows.

Preparing streams: worker processes tokenize units (a file, or a range of a data set's
documents) in parallel and the writer takes their tokens in order, holding one unit's tokens
and less than one window of carry, so memory does not grow with the corpus. The split is written
into `SPLIT.partial/` and renamed when complete: a failed run leaves no half corpus, and an
existing split is never overwritten.

Training order is `batching.shuffled_epochs` over the windows (a new permutation every epoch; the
window boundaries stay where they were cut, unlike the in-memory path's per-epoch offsets), split
between processes by `batching.per_process_batches`: process p reads only its own rows, with
random access, and the iterator's position is checkpointable. Start-up reads the manifest only.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

from jaxlm.data import batching, tokenizers

FORMAT = "jaxlm-token-windows/1"
MANIFEST = "manifest.json"
SHARD_BYTES = 64 << 20
UNIT_BYTES = 4 << 20  # text files per worker task


# --- Units: what one worker tokenizes --------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Unit:
    """Documents a worker reads and tokenizes on its own: `kind` is 'text' (each file of `paths`
    is one document), 'jsonl' (every line of each file of `paths` is a JSON object whose
    `text_key` is a document), 'source' (documents start..stop of `get_source(**source)`) or 'joined' (every
    document of `get_source(**source)` joined as one text: Tiny Shakespeare's chunks)."""

    kind: str
    paths: tuple[str, ...] = ()
    text_key: str = "text"
    source: tuple = ()  # sorted (key, value) pairs of `builders.get_source` arguments
    start: int = 0
    stop: int = 0


def _jsonl_documents(path: str, text_key: str) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {number}: not a JSON object ({e.msg}).") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                raise ValueError(f"{path}, line {number}: needs a string field {text_key!r} "
                                 f"(found keys {sorted(record) if isinstance(record, dict) else type(record).__name__}).")
            yield record[text_key]


def documents(unit: Unit) -> Iterator[str]:
    """The documents of `unit`, in order."""
    if unit.kind == "text":
        from jaxlm.data import readers  # pylint: disable=import-outside-toplevel

        for path in unit.paths:
            yield readers.read_text(path)
    elif unit.kind == "jsonl":
        for path in unit.paths:
            yield from _jsonl_documents(path, unit.text_key)
    else:
        from jaxlm.data import builders  # pylint: disable=import-outside-toplevel  (imports TFDS)

        source = builders.get_source(**dict(unit.source))
        if unit.kind == "joined":
            yield "".join(source.iter_texts())
        else:
            for start in range(unit.start, unit.stop, 256):
                yield from source.__getitems__(range(start, min(start + 256, unit.stop)))


def _file_groups(paths: Sequence[str], unit_bytes: int) -> list[tuple[str, ...]]:
    """Consecutive files in groups of about `unit_bytes` (a larger file alone): few units for many
    small files, so that handing units to workers costs little next to tokenizing them."""
    groups: list[list[str]] = []
    size = unit_bytes
    for path in paths:
        if size >= unit_bytes:
            groups.append([])
            size = 0
        groups[-1].append(path)
        size += os.path.getsize(path)
    return [tuple(g) for g in groups]


def source_units(*, name: str, split: str, data_dir: str = "", files: str = "", text_key: str = "text",
                 documents_per_unit: int = 2048, unit_bytes: int = UNIT_BYTES) -> list[Unit]:
    """The units of `split` of a data set named as a run names it (`data.name`, `data.files`,
    `data.text_key`; see `builders.get_source`): the same documents, in the same order.

    `jaxlm_text_files` with several files is read straight from the files (units of about
    `unit_bytes`, no TFDS copy of the corpus); other data sets by ranges of `documents_per_unit`
    documents."""
    from jaxlm.data import builders  # pylint: disable=import-outside-toplevel  (imports TFDS)

    if name == builders.TEXT_FILES:
        paths = builders.match_files(files)
        if len(paths) > 1:
            train, validation = builders.split_paths(paths, builders.TextFilesConfig.val_fraction)
            chosen = {"train": train, "validation": validation}.get(split)
            if chosen is None:
                raise ValueError(f"{builders.TEXT_FILES} has splits 'train' and 'validation', not {split!r}.")
            return [Unit("text", paths=group) for group in _file_groups(chosen, unit_bytes)]
    arguments = tuple(sorted(dict(name=name, split=split, data_dir=data_dir, files=files, text_key=text_key).items()))
    source = builders.get_source(name, split, data_dir=data_dir, files=files, text_key=text_key)
    if source.one_document:
        return [Unit("joined", source=arguments)]
    return [Unit("source", source=arguments, start=s, stop=min(s + documents_per_unit, len(source)))
            for s in range(0, len(source), documents_per_unit)]


def jsonl_units(files: str, text_key: str = "text", unit_bytes: int = UNIT_BYTES) -> list[Unit]:
    """The JSONL files that the comma-separated globs `files` match (sorted), in units of about
    `unit_bytes`."""
    from jaxlm.data import builders  # pylint: disable=import-outside-toplevel

    return [Unit("jsonl", paths=group, text_key=text_key)
            for group in _file_groups(builders.match_files(files), unit_bytes)]


# --- Preparing ---------------------------------------------------------------------------------


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<i4")


_worker_tokenizer: tokenizers.Tokenizer | None = None


def _load_worker_tokenizer(directory: str) -> None:
    global _worker_tokenizer  # pylint: disable=global-statement  (one per worker process)
    _worker_tokenizer = tokenizers.load(directory)


def _tokenize(unit: Unit) -> tuple[int, np.ndarray]:
    """(documents, their tokens joined by EOS) of one unit, in a worker."""
    tok = _worker_tokenizer
    dtype = token_dtype(tok.vocab_size)
    pieces, count = [], 0
    separator = None if tok.eos_id is None else np.array([tok.eos_id], dtype)
    for text in documents(unit):
        if count and separator is not None:
            pieces.append(separator)
        pieces.append(tok.encode(text).astype(dtype))
        count += 1
    return count, (np.concatenate(pieces) if pieces else np.zeros([0], dtype))


class _ShardWriter:
    """Cuts a token stream into windows and writes them to numbered ArrayRecord shards."""

    def __init__(self, directory: Path, window: int, dtype: np.dtype, windows_per_shard: int):
        self.directory, self.window, self.dtype = directory, window, dtype
        self.windows_per_shard = windows_per_shard
        self.carry = np.zeros([0], dtype)
        self.shards: list[dict] = []
        self.writer = None
        self.tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        self.tokens += len(tokens)
        tokens = np.concatenate([self.carry, tokens]) if len(self.carry) else tokens
        whole = len(tokens) // self.window * self.window
        for row in tokens[:whole].reshape(-1, self.window):
            self._write(row.tobytes())
        self.carry = tokens[whole:].copy()

    def _write(self, record: bytes) -> None:
        from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel

        if self.writer is None:
            name = f"windows-{len(self.shards):05d}.array_record"
            self.writer = array_record_module.ArrayRecordWriter(str(self.directory / name), "group_size:1")
            self.shards.append({"file": name, "windows": 0})
        self.writer.write(record)
        self.shards[-1]["windows"] += 1
        if self.shards[-1]["windows"] == self.windows_per_shard:
            self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _in_order(pool, units: Sequence[Unit], ahead: int) -> Iterator[tuple[int, np.ndarray]]:
    """`_tokenize` of each unit, in order, with at most `ahead` units in flight: results wait for
    the writer in bounded numbers (`Pool.imap` would queue every finished unit's tokens)."""
    pending: collections.deque = collections.deque()
    remaining = iter(units)
    for unit in itertools.islice(remaining, ahead):
        pending.append(pool.apply_async(_tokenize, (unit,)))
    while pending:
        result = pending.popleft().get()
        for unit in itertools.islice(remaining, 1):
            pending.append(pool.apply_async(_tokenize, (unit,)))
        yield result


def prepare(
    output: str | os.PathLike[str],
    split: str,
    units: Sequence[Unit],
    *,
    tokenizer_dir: str | os.PathLike[str],
    seq_len: int,
    workers: int = 0,
    shard_bytes: int = SHARD_BYTES,
    description: str = "",
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Tokenizes the documents of `units` into `output/split/` and returns its manifest.

    Args:
      output: the corpus directory (it holds one folder per split; `output/tokenizer` is the
        tokenizer the run will be checked against).
      split: the split's name, e.g. 'train'.
      units: the documents, in order (see `source_units`, `jsonl_units`).
      tokenizer_dir: a saved tokenizer (`tokenizers.save`); the workers load it.
      seq_len: tokens per training example (windows hold seq_len + 1).
      workers: tokenizing processes (0: the CPU count).
      shard_bytes: bytes of windows per shard (at least one window).
      description: what the documents are, for the manifest.
      progress: called with (units done, units) as the writer takes each unit.

    Raises:
      FileExistsError: when `output/split` exists (it is never overwritten).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive; got {seq_len}.")
    final = Path(output) / split
    if final.exists():
        raise FileExistsError(f"{str(final)!r} exists; prepared splits are never overwritten: choose another "
                              "output directory or delete it first.")
    partial = Path(output) / f"{split}.partial"
    shutil.rmtree(partial, ignore_errors=True)  # what a failed earlier run left
    partial.mkdir(parents=True)
    tokenizer = tokenizers.load(tokenizer_dir)
    dtype, window = token_dtype(tokenizer.vocab_size), seq_len + 1
    writer = _ShardWriter(partial, window, dtype, max(1, shard_bytes // (window * dtype.itemsize)))
    separator = None if tokenizer.eos_id is None else np.array([tokenizer.eos_id], dtype)
    start, documents_count = time.time(), 0
    workers = workers or os.cpu_count() or 1
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold JAX threads
    with context.Pool(workers, _load_worker_tokenizer, (str(tokenizer_dir),)) as pool:
        for done, (count, tokens) in enumerate(_in_order(pool, units, ahead=2 * workers), start=1):
            if count:
                if documents_count and separator is not None:
                    writer.add(separator)
                writer.add(tokens)
                documents_count += count
            if progress:
                progress(done, len(units))
    writer.close()
    windows = sum(s["windows"] for s in writer.shards)
    manifest = {
        "format": FORMAT,
        "split": split,
        "description": description,
        "seq_len": seq_len,
        "window": window,
        "dtype": dtype.str,
        "documents": documents_count,
        "units": len(units),
        "tokens": writer.tokens,
        "windows": windows,
        "dropped_tail_tokens": writer.tokens - windows * window,
        "shards": writer.shards,
        "tokenizer": {"kind": tokenizer.kind, "fingerprint": tokenizer.fingerprint,
                      "vocab_size": tokenizer.vocab_size},
        "seconds": round(time.time() - start, 3),
    }
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=1))
    os.rename(partial, final)
    return manifest


# --- Reading -----------------------------------------------------------------------------------


class Corpus(Sequence[np.ndarray]):
    """The windows of one prepared split: `len`, `[i]` (int32[seq_len + 1]) and `windows(rows)`."""

    def __init__(self, directory: str | os.PathLike[str], split: str):
        self.path = Path(directory) / split
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            found = sorted(p.name for p in Path(directory).iterdir() if (p / MANIFEST).is_file()) \
                if Path(directory).is_dir() else []
            raise FileNotFoundError(f"No prepared split {split!r} in {str(directory)!r} (no {manifest_path}); "
                                    f"prepared splits there: {found or 'none'} (tools/prepare_data.py writes them).")
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{manifest_path} is not a {FORMAT} manifest (format {self.manifest.get('format')!r}).")
        self.dtype = np.dtype(self.manifest["dtype"])
        self.window = self.manifest["window"]
        self.source = grain.sources.ArrayRecordDataSource([str(self.path / s["file"]) for s in self.manifest["shards"]]) \
            if self.manifest["shards"] else []
        if len(self.source) != self.manifest["windows"]:
            raise ValueError(f"{self.path}: the shards hold {len(self.source)} windows but the manifest says "
                             f"{self.manifest['windows']}; the split is incomplete or corrupt: prepare it again.")

    @property
    def seq_len(self) -> int:
        return self.window - 1

    def __len__(self) -> int:
        return self.manifest["windows"]

    def __getitem__(self, index: int) -> np.ndarray:  # type: ignore[override]
        return np.frombuffer(self.source[index], self.dtype).astype(np.int32)

    def windows(self, rows: Iterable[int]) -> np.ndarray:
        """int32[len(rows), seq_len + 1]."""
        records = self.source.__getitems__([int(r) for r in rows])
        return np.stack([np.frombuffer(r, self.dtype) for r in records]).astype(np.int32)


def check_tokenizer(corpus: Corpus, tokenizer: tokenizers.Tokenizer) -> None:
    """Raises when `corpus` was prepared with another tokenizer than the run's, naming both."""
    saved = corpus.manifest["tokenizer"]
    if saved["fingerprint"] != tokenizer.fingerprint or saved["kind"] != tokenizer.kind:
        raise ValueError(
            f"{corpus.path} was prepared with the {saved['kind']!r} tokenizer {saved['fingerprint']!r} "
            f"(vocab {saved['vocab_size']}) but this run's tokenizer is the {tokenizer.kind!r} tokenizer "
            f"{tokenizer.fingerprint!r} (vocab {tokenizer.vocab_size}); prepare the corpus with the run's "
            "tokenizer, or give the run the corpus's (data.tokenizer and data.tokenizer_path, or a new workdir).")


def check_seq_len(corpus: Corpus, seq_len: int) -> None:
    if corpus.seq_len != seq_len:
        raise ValueError(f"{corpus.path} holds windows of seq_len={corpus.seq_len} but data.seq_len={seq_len}; "
                         "prepare the corpus with the run's seq_len or set data.seq_len to it.")


def _inputs_targets(windows: np.ndarray) -> dict[str, np.ndarray]:
    return {"inputs": windows[..., :-1], "targets": windows[..., 1:]}


def train_dataset(corpus: Corpus, *, global_batch_size: int, seed: int, process_index: int = 0,
                  process_count: int = 1) -> grain.MapDataset:
    """Shuffled, repeated batches of `{'inputs', 'targets'}` int32[b, seq_len]: this process's rows
    of every global batch, read with random access."""
    if len(corpus) < global_batch_size:
        raise ValueError(f"{corpus.path} has {len(corpus)} windows, fewer than one global batch of "
                         f"{global_batch_size}; lower train.batch_size or prepare more data.")
    return batching.per_process_batches(
        batching.shuffled_epochs(len(corpus), seed, lambda epoch, i: _inputs_targets(corpus[i])),
        global_batch_size=global_batch_size, process_index=process_index, process_count=process_count)


def eval_batches(corpus: Corpus, *, global_batch_size: int, max_batches: int = 0, process_index: int = 0,
                 process_count: int = 1) -> list[dict[str, Any]]:
    """The windows in order (a last global batch they do not fill is dropped, as in `lm`)."""
    if len(corpus) < global_batch_size:
        raise ValueError(f"{corpus.path} has {len(corpus)} windows, fewer than one global batch of "
                         f"{global_batch_size}.")
    return batching.eval_batches(len(corpus), lambda rows: _inputs_targets(corpus.windows(rows)),
                                 global_batch_size=global_batch_size, max_batches=max_batches,
                                 process_index=process_index, process_count=process_count)
