"""TFDS builders for local text, read as array_record data sources (no TensorFlow).

`get_source(name, split, ...)` returns the documents of one split as a sequence
of `str` (`len`, `src[i]`, `src.__getitems__(indices)`):

* `jaxlm_tiny_shakespeare`: `$JAXLM_DATA_DIR/tinyshakespeare/input.txt` with
  nanoGPT's split (first 90% of the characters `train`, the rest
  `validation`), each split stored as ordered chunks of `CHUNK_CHARS`
  characters of one logical document.
* `jaxlm_text_files`: your own files (`files='a/*.txt,b/**/*.py'`); one file is
  one document; every k-th file of the sorted list is `validation`.
* any other name: a TFDS catalog dataset, read with `tfds.data_source` (it must
  be, or be preparable as, array_record; `text_key` names its text feature).

The jaxlm builders prepare on first use and then just read. Prepared data lives
under `data_dir` (default `$TFDS_DATA_DIR`, else `~/tensorflow_datasets`):
`DATA_DIR/jaxlm_tiny_shakespeare/1.0.0/` and
`DATA_DIR/jaxlm_text_files/files_<hash>/1.0.0/`, where the hash covers the
globs, `val_fraction` and the matched files' paths, sizes and modification
times, so different corpora never collide and edited files are prepared anew.
Preparing is not safe to run from several processes at once into one shared
directory: on many hosts, prepare once (e.g. on host 0, then barrier) or give
each host its own `data_dir`.

TFDS notes: `as_dataset()` needs TensorFlow, so only `as_data_source()` /
`tfds.data_source()` are used; the builders are defined outside a TFDS package
and so build their `DatasetInfo(builder=self, ...)` directly and override
`code_path` (see `_LocalCodePath`); `disable_shuffling=True` keeps examples in
generation order (TFDS otherwise shuffles them by key hash).
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds
from etils import epath

TINY_SHAKESPEARE = "jaxlm_tiny_shakespeare"
TEXT_FILES = "jaxlm_text_files"
CHUNK_CHARS = 10_000
TRAIN_FRACTION = 0.9  # nanoGPT: train = data[:int(n * 0.9)]
_VERSION = tfds.core.Version("1.0.0")


def _text_features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({"text": tfds.features.Text()})


def jaxlm_data_dir() -> Path:
    """Where jaxlm's raw data sets live: `$JAXLM_DATA_DIR`, else `../shared/data`.

    `../shared/data` is tried relative to the repository root first and to the
    current directory second.
    """
    if os.environ.get("JAXLM_DATA_DIR"):
        return Path(os.environ["JAXLM_DATA_DIR"]).expanduser()
    candidates = [
        Path(__file__).resolve().parents[2] / ".." / "shared" / "data",
        Path.cwd() / ".." / "shared" / "data",
    ]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    return candidates[0].resolve()


def tfds_data_dir(data_dir: str = "") -> str:
    """The directory prepared TFDS data lives in (`data_dir`, else TFDS's default)."""
    if data_dir:
        return os.path.expanduser(data_dir)
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def _chunks(text: str, size: int = CHUNK_CHARS) -> Iterator[tuple[int, dict[str, str]]]:
    for i, start in enumerate(range(0, len(text), size)):
        yield i, {"text": text[start : start + size]}


def _split_chars(text: str) -> tuple[str, str]:
    n = int(len(text) * TRAIN_FRACTION)
    return text[:n], text[n:]


class _LocalCodePath:
    """Points TFDS's `code_path` at this file.

    TFDS 4.9.10 computes `code_path` for a builder inside a package through
    `importlib_resources`, which it does not install; without this override
    `download_and_prepare` fails with ModuleNotFoundError.
    """

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)


class JaxlmTinyShakespeare(_LocalCodePath, tfds.core.GeneratorBasedBuilder):
    """Tiny Shakespeare with nanoGPT's 90/10 character split.

    Concatenating the examples of a split in index order gives the split's text
    exactly (one logical document, stored in chunks).
    """

    name = TINY_SHAKESPEARE
    VERSION = _VERSION
    RELEASE_NOTES = {"1.0.0": "nanoGPT split, 10k-character chunks."}

    def __init__(self, *, input_path: str = "", **kwargs: Any):
        """Args: input_path: the raw text (default `$JAXLM_DATA_DIR/tinyshakespeare/input.txt`)."""
        self._input_path = input_path
        super().__init__(**kwargs)

    @property
    def one_document(self) -> bool:
        return True

    @property
    def input_path(self) -> Path:
        return Path(self._input_path or jaxlm_data_dir() / "tinyshakespeare" / "input.txt")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Tiny Shakespeare (karpathy/char-rnn), split as nanoGPT does.",
            features=_text_features(),
            homepage="https://github.com/karpathy/char-rnn",
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        del dl_manager  # Offline: the file is local.
        if not self.input_path.is_file():
            raise FileNotFoundError(
                f"Tiny Shakespeare text not found at {str(self.input_path)!r}. Set $JAXLM_DATA_DIR"
                " to the directory holding tinyshakespeare/input.txt."
            )
        train, validation = _split_chars(self.input_path.read_text(encoding="utf-8"))
        return {
            "train": self._generate_examples(train),
            "validation": self._generate_examples(validation),
        }

    def _generate_examples(self, text: str) -> Iterator[tuple[int, dict[str, str]]]:
        return _chunks(text)


@dataclasses.dataclass(eq=False)
class TextFilesConfig(tfds.core.BuilderConfig):
    """A corpus of local files; build it with `text_files_config`.

    Attributes:
      patterns: the globs, made absolute.
      paths: the matched files, sorted.
      val_fraction: about this fraction of the files is the validation split.
    """

    patterns: tuple[str, ...] = ()
    paths: tuple[str, ...] = dataclasses.field(default=(), repr=False)
    val_fraction: float = 0.1


def _expand(pattern: str) -> str:
    return os.path.abspath(os.path.expanduser(pattern))


def match_files(files: str) -> list[str]:
    """Returns the sorted files that comma-separated globs match (`**` recurses)."""
    patterns = [_expand(p.strip()) for p in files.split(",") if p.strip()]
    if not patterns:
        raise ValueError(f'{TEXT_FILES} needs `files`, comma-separated globs such as "data/*.txt".')
    paths = set()
    for pattern in patterns:
        paths.update(p for p in globlib.glob(pattern, recursive=True) if os.path.isfile(p))
    if not paths:
        raise FileNotFoundError(f"No files match {files!r} (expanded: {', '.join(patterns)}).")
    return sorted(paths)


def text_files_config(files: str, val_fraction: float = 0.1) -> TextFilesConfig:
    """The builder config for the corpus that `files` (comma-separated globs) matches.

    Its name, and so its directory under the data dir, is a hash of the globs,
    `val_fraction` and each matched file's path, size and modification time.
    """
    if not 0 < val_fraction <= 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5]; got {val_fraction}.")
    paths = match_files(files)
    patterns = tuple(sorted(_expand(p.strip()) for p in files.split(",") if p.strip()))
    stats = [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths]
    key = json.dumps([patterns, val_fraction, stats])
    return TextFilesConfig(
        name="files_" + hashlib.sha256(key.encode()).hexdigest()[:16],
        description=f"{len(paths)} files matching {', '.join(patterns)}",
        patterns=patterns,
        paths=tuple(paths),
        val_fraction=val_fraction,
    )


def split_paths(paths: Sequence[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Splits sorted `paths` into (train, validation): every k-th file, k = round(1/val_fraction).

    Validation takes files 0, k, 2k, ... so that two or more files always give
    both splits at least one file.
    """
    k = max(2, round(1 / val_fraction))
    return (
        [p for i, p in enumerate(paths) if i % k],
        [p for i, p in enumerate(paths) if not i % k],
    )


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


class JaxlmTextFiles(_LocalCodePath, tfds.core.GeneratorBasedBuilder):
    """Local text files: one file is one document (example), in sorted path order.

    With two or more files, `validation` is every k-th file (see `split_paths`).
    With one file, its characters are split 90/10 like Tiny Shakespeare and each
    split is stored in chunks of one logical document. Files that are not valid
    UTF-8 are decoded with errors='replace' (bad bytes become U+FFFD).

    Build it with `config=text_files_config(files)`; the config has no default.
    """

    name = TEXT_FILES
    VERSION = _VERSION
    RELEASE_NOTES = {"1.0.0": "One document per file; every k-th file is validation."}

    @property
    def one_document(self) -> bool:
        """Whether the examples are chunks of one document (a single input file)."""
        return len(self.builder_config.paths) == 1

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Local text files, one document per file.",
            features=_text_features(),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        del dl_manager
        config = self.builder_config
        if not isinstance(config, TextFilesConfig) or not config.paths:
            raise ValueError(f"{TEXT_FILES} needs config=text_files_config(files).")
        if self.one_document:
            train, validation = _split_chars(_read(config.paths[0]))
            return {"train": _chunks(train), "validation": _chunks(validation)}
        train, validation = split_paths(config.paths, config.val_fraction)
        return {
            "train": self._generate_examples(train),
            "validation": self._generate_examples(validation),
        }

    def _generate_examples(self, paths: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
        for i, path in enumerate(paths):
            yield i, {"text": _read(path)}


class TextSource(Sequence[str]):
    """The documents of one split as `str`, over a TFDS data source.

    Attributes:
      one_document: the examples are consecutive chunks of one document (join
        them without separators).
    """

    def __init__(self, source: Any, *, text_key: str = "text", one_document: bool = False):
        self.source = source
        self.text_key = text_key
        self.one_document = one_document

    def __len__(self) -> int:
        return len(self.source)

    def _text(self, example: dict[str, Any]) -> str:
        try:
            value = example[self.text_key]
        except KeyError:
            raise KeyError(
                f"Examples have no feature {self.text_key!r}; features:"
                f" {sorted(example)}. Set text_key."
            ) from None
        return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} documents")
        return self._text(self.source[index % len(self)])

    def __getitems__(self, indices: Sequence[int]) -> list[str]:
        return [self._text(e) for e in self.source.__getitems__(list(indices))]

    def iter_texts(self, batch_size: int = 256) -> Iterator[str]:
        """Yields the documents in order, reading `batch_size` at a time."""
        for start in range(0, len(self), batch_size):
            yield from self.__getitems__(range(start, min(start + batch_size, len(self))))


def _check_split(name: str, split: str, builder: tfds.core.DatasetBuilder) -> None:
    available = sorted(builder.info.splits.keys())
    if re.fullmatch(r"\w+", split) and split not in available:
        raise ValueError(
            f"Unknown split {split!r} of {name}; available splits: {', '.join(available)}."
        )


def get_builder(
    name: str, *, data_dir: str = "", files: str = "", val_fraction: float = 0.1
) -> tfds.core.DatasetBuilder:
    """Returns the prepared jaxlm builder `name` (preparing it on first use)."""
    kwargs = dict(data_dir=tfds_data_dir(data_dir), file_format="array_record")
    if name == TINY_SHAKESPEARE:
        builder = JaxlmTinyShakespeare(**kwargs)
    elif name == TEXT_FILES:
        builder = JaxlmTextFiles(config=text_files_config(files, val_fraction), **kwargs)
    else:
        raise ValueError(f"{name!r} is not a jaxlm builder ({TINY_SHAKESPEARE}, {TEXT_FILES}).")
    builder.download_and_prepare()  # Returns at once when prepared already.
    return builder


def get_source(
    name: str, split: str, *, data_dir: str = "", files: str = "", text_key: str = "text"
) -> TextSource:
    """Returns the documents of `split` of data set `name` as strings.

    Args:
      name: `jaxlm_tiny_shakespeare`, `jaxlm_text_files` or a TFDS catalog name
        (with optional `/config:version`).
      split: e.g. 'train' or 'validation' (TFDS slicing such as 'train[:10%]' works).
      data_dir: where prepared data lives (default `$TFDS_DATA_DIR`, else
        `~/tensorflow_datasets`).
      files: for `jaxlm_text_files`, comma-separated globs of text files.
      text_key: the text feature of a catalog data set.

    Returns:
      A `TextSource`: `len`, `[i]` and `__getitems__` give `str` documents.
    """
    if files and name != TEXT_FILES:
        raise ValueError(f"`files` is only used with name={TEXT_FILES!r}, not {name!r}.")
    if name in (TINY_SHAKESPEARE, TEXT_FILES):
        if text_key != "text":
            raise ValueError(f"{name} has the feature 'text', not {text_key!r}.")
        builder = get_builder(name, data_dir=data_dir, files=files)
        _check_split(name, split, builder)
        return TextSource(builder.as_data_source(split=split), one_document=builder.one_document)
    source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=True)
    return TextSource(source, text_key=text_key)
