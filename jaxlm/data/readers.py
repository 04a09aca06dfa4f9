"""Readers per file format, shared by the TFDS builders (`builders`) and by whoever reads a
local file directly (`data_path` in evaluation, `read_aligned` pairs). No TFDS, no TensorFlow.

  read_text(path) -> str                        # one UTF-8 document
  text_chunks(text) / split_characters(text)    # one document stored in chunks; nanoGPT's split
  read_lines(path) -> list[str]                 # plain or .gz, only '\\n' ends a line
  read_aligned(source_path, target_path) -> [(source, target)]
  read_tsv(path) -> (texts, labels)             # sentence classification
  read_conll(path) -> [(tokens, tags)]          # token tagging
  tsv_label_names / conll_tag_names / label_ids # class names and ids of labels as written
  read_idx(path, magic) / read_idx_split(images_path, labels_path)  # MNIST's IDX files

Errors name the file (and the line, where there is one).
"""

from __future__ import annotations

import gzip
import math
import os
import re
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

TSV_TEXT_COLUMNS = ("sentence", "text")  # the first of these in the header is the text
CHUNK_CHARS = 10_000
TRAIN_FRACTION = 0.9  # nanoGPT: train = data[:int(n * 0.9)]
IMAGES_MAGIC = 2051  # IDX: uint8 data (0x08), 3 dimensions.
LABELS_MAGIC = 2049  # IDX: uint8 data (0x08), 1 dimension.


def read_text(path: str | os.PathLike[str]) -> str:
    """The text of a UTF-8 file; invalid bytes are decoded as U+FFFD."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def text_chunks(text: str, size: int = CHUNK_CHARS) -> Iterator[str]:
    """The consecutive chunks of `size` characters of one document."""
    for start in range(0, len(text), size):
        yield text[start : start + size]


def split_characters(text: str) -> tuple[str, str]:
    """nanoGPT's split of one text: the first TRAIN_FRACTION of the characters, the rest."""
    n = int(len(text) * TRAIN_FRACTION)
    return text[:n], text[n:]


def read_lines(path: str | os.PathLike[str]) -> list[str]:
    """Returns the lines of a UTF-8 text file (plain, or gzip when the name ends in .gz).

    Only '\\n' ends a line (a '\\r' before it is dropped): `str.splitlines` would also split at
    characters such as U+2028 inside a sentence and break the alignment of a parallel corpus.
    Invalid UTF-8 is decoded as U+FFFD.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        lines = f.read().decode("utf-8", errors="replace").split("\n")
    if lines[-1] == "":
        lines.pop()  # The newline that ends the last line (or an empty file).
    return [line.removesuffix("\r") for line in lines]


def read_aligned(
    source_path: str | os.PathLike[str], target_path: str | os.PathLike[str]
) -> list[tuple[str, str]]:
    """Returns the (source line, target line) pairs of two line-aligned files.

    Raises:
      ValueError: naming both files, when their line counts differ.
    """
    sources, targets = read_lines(source_path), read_lines(target_path)
    if len(sources) != len(targets):
        raise ValueError(
            f"Line counts differ: {str(source_path)!r} has {len(sources)} lines but"
            f" {str(target_path)!r} has {len(targets)}; line i of the source file must translate"
            " line i of the target file."
        )
    return list(zip(sources, targets))


def _file_error(path: str | os.PathLike[str], line: int, message: str) -> ValueError:
    return ValueError(f"{path}, line {line}: {message}")


def read_tsv(path: str | os.PathLike[str]) -> tuple[list[str], list[str]]:
    """Returns the (texts, labels) of a sentence-classification TSV file, labels as written.

    The first line names the tab-separated columns: the text is the `sentence` or `text`
    column, the label the `label` column; other columns are ignored, as are blank lines.

    Raises:
      ValueError: naming the file and line, for a header without those columns, a row whose
        number of fields differs from the header's, or an empty label.
    """
    lines = read_lines(path)
    header = lines[0].split("\t") if lines else []
    text_column = next((c for c in TSV_TEXT_COLUMNS if c in header), None)
    if text_column is None or "label" not in header:
        raise _file_error(
            path,
            1,
            f"the header {header} needs a text column ({' or '.join(TSV_TEXT_COLUMNS)})"
            " and a 'label' column, separated by tabs.",
        )
    text, label = header.index(text_column), header.index("label")
    texts, labels = [], []
    for number, line in enumerate(lines[1:], start=2):
        if not line:
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise _file_error(
                path, number, f"{len(fields)} tab-separated fields; the header has {len(header)}."
            )
        if not fields[label]:
            raise _file_error(path, number, "the label is empty.")
        texts.append(fields[text])
        labels.append(fields[label])
    return texts, labels


def read_conll(path: str | os.PathLike[str]) -> list[tuple[list[str], list[str]]]:
    """Returns the (tokens, tags) sentences of a CoNLL file, tags as written.

    One token per line in whitespace-separated columns, the token first and its tag last (e.g.
    CoNLL-2003's `TOKEN POS CHUNK NER`); a blank line ends a sentence; `-DOCSTART-` lines mark
    documents and are skipped.

    Raises:
      ValueError: naming the file and line, for a line with one column, or with another number
        of columns than the file's first token line.
    """
    sentences: list[tuple[list[str], list[str]]] = []
    tokens: list[str] = []
    tags: list[str] = []
    columns = 0
    for number, line in enumerate(read_lines(path), start=1):
        fields = line.split()
        if not fields:
            if tokens:
                sentences.append((tokens, tags))
                tokens, tags = [], []
            continue
        if len(fields) < 2 or columns and len(fields) != columns:
            expected = columns or "at least 2 (token ... tag)"
            raise _file_error(path, number, f"{len(fields)} columns, expected {expected}.")
        columns = len(fields)
        if fields[0] != "-DOCSTART-":
            tokens.append(fields[0])
            tags.append(fields[-1])
    if tokens:
        sentences.append((tokens, tags))
    return sentences


def _is_integer(label: str) -> bool:
    return re.fullmatch(r"[0-9]+", label) is not None


def tsv_label_names(labels: Sequence[str]) -> list[str]:
    """The class names for `labels`: '0'..'k' when all are integers (k the largest), else the
    sorted distinct strings."""
    if all(_is_integer(label) for label in labels):
        return [str(i) for i in range(max(int(label) for label in labels) + 1)]
    return sorted(set(labels))


def conll_tag_names(sentences: Sequence[tuple[Sequence[str], Sequence[str]]]) -> list[str]:
    """The sorted distinct tags of `sentences`, 'O' (outside any entity) first."""
    tags = {tag for _, sentence_tags in sentences for tag in sentence_tags}
    return sorted(tags, key=lambda tag: (tag != "O", tag))


def label_ids(
    labels: Sequence[str],
    names: Sequence[str],
    path: str | os.PathLike[str],
    *,
    integers: bool = True,
) -> list[int]:
    """Maps labels as written to class ids: a name to its index, else (`integers`) an integer
    label to itself (SST-2 writes 0/1 for negative/positive).

    Raises:
      ValueError: naming `path`, for a label that is neither.
    """
    index = {name: i for i, name in enumerate(names)}
    ids = []
    for label in labels:
        i = index.get(label, int(label) if integers and _is_integer(label) else -1)
        if not 0 <= i < len(names):
            raise ValueError(f"{path}: label {label!r} is not one of {list(names)}.")
        ids.append(i)
    return ids


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


def read_idx_split(
    images_path: str | os.PathLike[str], labels_path: str | os.PathLike[str], num_classes: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """Returns (uint8[n, H, W, 1], uint8[n]) from an IDX images file and its labels file
    (e.g. `train-images-idx3-ubyte.gz` and `train-labels-idx1-ubyte.gz`)."""
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC)
    if len(images) != len(labels):
        raise ValueError(
            f"{str(images_path)!r} holds {len(images)} images but {str(labels_path)!r}"
            f" {len(labels)} labels."
        )
    if len(labels) and labels.max() >= num_classes:
        raise ValueError(f"{str(labels_path)!r} has label {labels.max()} >= {num_classes}.")
    return images[..., None], labels
