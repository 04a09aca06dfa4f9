"""TFDS builders for local text, read as array_record data sources (no TensorFlow).

`get_source(name, split, ...)` returns the documents of one split as a sequence
of `str` (`len`, `src[i]`, `src.__getitems__(indices)`); `get_pairs(name, split,
source_key=, target_key=, ...)` returns the translation pairs of a parallel
corpus as a sequence of `(source, target)` strings:

* `jaxlm_tiny_shakespeare`: `$JAXLM_DATA_DIR/tinyshakespeare/input.txt` with
  nanoGPT's split (first 90% of the characters `train`, the rest
  `validation`), each split stored as ordered chunks of `CHUNK_CHARS`
  characters of one logical document.
* `jaxlm_text_files`: your own files (`files='a/*.txt,b/**/*.py'`, each glob
  matching a file at least); one file is one document; every k-th file of the
  sorted list is `validation`.
* `jaxlm_multi30k`: Multi30k task 1 from `$JAXLM_DATA_DIR/multi30k/`
  (`{train,val}.{en,de}.gz`), splits `train` (29,000 pairs) and `validation`
  (1,014), features `en` and `de`.
* `jaxlm_parallel_text`: your own line-aligned files (`files='SRC,TGT'`, plain
  or .gz; line i of SRC translates line i of TGT), one split `train`, features
  `source` and `target`.
* `jaxlm_sst2`: GLUE SST-2 from `$JAXLM_DATA_DIR/sst2/` (`train.tsv`,
  `dev.tsv`), splits `train` (67,349 sentences) and `validation` (872),
  features `text` and `label` (ClassLabel `SST2_LABELS`).
* `jaxlm_tsv`: your own sentence-classification files, one per split
  (`files='train=PATH,validation=PATH'`; see `read_tsv`), features `text` and
  `label` (integer labels 0..k keep their ids; string labels become the sorted
  names found in the train file).
* `jaxlm_conll2003`: CoNLL-2003 English NER from `$JAXLM_DATA_DIR/conll2003/`
  (`train.txt`, `valid.txt`), splits `train` (14,041 sentences) and
  `validation` (3,250), features `tokens` and `tags` (ClassLabel `CONLL_TAGS`).
* `jaxlm_conll`: your own CoNLL files, one per split
  (`files='train=PATH,validation=PATH'`; see `read_conll`), features `tokens`
  and `tags` (the train file's sorted tags, 'O' first).
* any other name: a TFDS catalog dataset, read with `tfds.data_source` (it must
  be, or be preparable as, array_record; `text_key` names its text feature, or
  `source_key` and `target_key` the two sides of a pair, e.g. 'en' and 'de' of
  'wmt14_translate/de-en').

* `jaxlm_mnist`, `jaxlm_fashion_mnist`: the gzipped IDX files in
  `$JAXLM_DATA_DIR/mnist` and `$JAXLM_DATA_DIR/fashion_mnist` (LeCun's file
  names), splits `train` (60,000) and `test` (10,000), features
  {'image': uint8[28, 28, 1], 'label': ClassLabel(10)}; read through `images`.

Every jaxlm builder is a `LocalFilesBuilder`: a name, where its files are, and a
row of `FORMATS`, the one table of readers (`readers`) and features that turns
the files of a split into examples. The labeled data sets (sst2, tsv, conll2003,
conll) are read as examples through `jaxlm.data.labeled.classification_source` /
`tagging_source`; their raw files can also be read without TFDS by
`readers.read_tsv` / `readers.read_conll`. A split without examples (its files
empty, or holding no rows) is a ValueError naming the data set, the split and
its files, raised before TFDS writes anything.

The jaxlm builders prepare on first use and then just read. Prepared data lives
under `data_dir` (default `$TFDS_DATA_DIR`, else `~/tensorflow_datasets`):
`DATA_DIR/jaxlm_tiny_shakespeare/1.0.0/`, `DATA_DIR/jaxlm_multi30k/1.0.0/`,
`DATA_DIR/jaxlm_text_files/files_<hash>/1.0.0/`,
`DATA_DIR/jaxlm_parallel_text/files_<hash>/1.0.0/` (and likewise `jaxlm_tsv`,
`jaxlm_conll`), where the hash covers the globs (or the files and their
splits), `val_fraction` and the files' paths, sizes and modification times,
so different corpora never collide and edited files are prepared anew.
Processes that share a `data_dir` (the processes of one multi-process run)
prepare one at a time under a file lock (`DATA_DIR/.NAME.lock`): the first
prepares, the others wait and then read what it wrote.

TFDS notes: `as_dataset()` needs TensorFlow, so only `as_data_source()` /
`tfds.data_source()` are used; the builders are defined outside a TFDS package
and so build their `DatasetInfo(builder=self, ...)` directly and override
`code_path` (see `LocalCodePath`); `disable_shuffling=True` keeps examples in
generation order (TFDS otherwise shuffles them by key hash).
"""

from __future__ import annotations

import dataclasses
import fcntl
import glob as globlib
import hashlib
import itertools
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from jaxlm.data import readers

TINY_SHAKESPEARE = "jaxlm_tiny_shakespeare"
TEXT_FILES = "jaxlm_text_files"
MULTI30K = "jaxlm_multi30k"
PARALLEL_TEXT = "jaxlm_parallel_text"
SST2 = "jaxlm_sst2"
TSV = "jaxlm_tsv"
CONLL2003 = "jaxlm_conll2003"
CONLL = "jaxlm_conll"
MNIST = "jaxlm_mnist"
FASHION_MNIST = "jaxlm_fashion_mnist"
CLASSIFICATION_BUILDERS = (SST2, TSV)
TAGGING_BUILDERS = (CONLL2003, CONLL)
IMAGE_BUILDERS = (MNIST, FASHION_MNIST)
FILES_BUILDERS = (TEXT_FILES, PARALLEL_TEXT, TSV, CONLL)  # the builders that read `files`
JAXLM_BUILDERS = (  # the text builders, read by get_source / get_pairs / labeled
    TINY_SHAKESPEARE,
    TEXT_FILES,
    MULTI30K,
    PARALLEL_TEXT,
    *CLASSIFICATION_BUILDERS,
    *TAGGING_BUILDERS,
)
SST2_LABELS = ("negative", "positive")
# IOB2 over PER, ORG, LOC, MISC in Hugging Face conll2003's order, so its label ids carry over.
CONLL_TAGS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")
IMAGE_SHAPE = (28, 28, 1)  # MNIST and Fashion-MNIST
NUM_IMAGE_CLASSES = 10
_VERSION = tfds.core.Version("1.0.0")


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


# The reader table: how the files of one split become examples, per format.

Examples = Iterable[dict[str, Any]]


def _text_examples(builder: LocalFilesBuilder, split: str, paths: Sequence[str]) -> Examples:
    if builder.one_document:  # One file, its characters split 90/10 and stored in chunks.
        train, validation = readers.split_characters(readers.read_text(paths[0]))
        text = train if split == "train" else validation
        return ({"text": chunk} for chunk in readers.text_chunks(text))
    return ({"text": readers.read_text(path)} for path in paths)  # One document per file.


def _aligned_examples(builder: LocalFilesBuilder, split: str, paths: Sequence[str]) -> Examples:
    source_key, target_key = builder.KEYS
    pairs = readers.read_aligned(*paths)
    return ({source_key: source, target_key: target} for source, target in pairs)


def _tsv_examples(builder: LocalFilesBuilder, split: str, paths: Sequence[str]) -> Examples:
    texts, labels = readers.read_tsv(paths[0])
    for text, label in zip(texts, readers.label_ids(labels, builder.names, paths[0])):
        yield {"text": text, "label": label}


def _conll_examples(builder: LocalFilesBuilder, split: str, paths: Sequence[str]) -> Examples:
    for tokens, tags in readers.read_conll(paths[0]):
        yield {"tokens": tokens, "tags": readers.label_ids(tags, builder.names, paths[0], integers=False)}


def _idx_examples(builder: LocalFilesBuilder, split: str, paths: Sequence[str]) -> Examples:
    images, labels = readers.read_idx_split(*paths, num_classes=NUM_IMAGE_CLASSES)
    return ({"image": image, "label": int(label)} for image, label in zip(images, labels))


def _class_label(builder: LocalFilesBuilder) -> tfds.features.ClassLabel:
    return tfds.features.ClassLabel(names=list(builder.names))


@dataclasses.dataclass(frozen=True)
class Format:
    """A file format: the features of its examples and the reader of one split's files.

    Attributes:
      features: builder -> the feature dict.
      examples: (builder, split, the split's files) -> its examples in file order. Readers of
        images and aligned text parse the files when called, so that a bad file fails before
        TFDS writes anything; the others read as TFDS iterates.
    """

    features: Callable[[LocalFilesBuilder], dict[str, Any]]
    examples: Callable[[LocalFilesBuilder, str, Sequence[str]], Examples]


FORMATS = {
    "text": Format(lambda b: {"text": tfds.features.Text()}, _text_examples),
    "aligned": Format(lambda b: {key: tfds.features.Text() for key in b.KEYS}, _aligned_examples),
    "tsv": Format(lambda b: {"text": tfds.features.Text(), "label": _class_label(b)}, _tsv_examples),
    "conll": Format(
        lambda b: {
            "tokens": tfds.features.Sequence(tfds.features.Text()),
            "tags": tfds.features.Sequence(_class_label(b)),
        },
        _conll_examples,
    ),
    "idx": Format(
        lambda b: {
            "image": tfds.features.Tensor(shape=IMAGE_SHAPE, dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=NUM_IMAGE_CLASSES),
        },
        _idx_examples,
    ),
}


class LocalCodePath:
    """Points TFDS's `code_path` at this file.

    TFDS 4.9.10 computes `code_path` for a builder inside a package through
    `importlib_resources`, which it does not install; without this override
    `download_and_prepare` fails with ModuleNotFoundError.
    """

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)


class LocalFilesBuilder(LocalCodePath, tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A TFDS builder over local files, read by the row `FORMAT` of `FORMATS`.

    Bundled data sets name their files in `SPLIT_FILES` (under `$JAXLM_DATA_DIR/DIRECTORY`, or
    `input_dir`); the others take them (and their class names) from a builder config. Examples
    keep the order of the files (`disable_shuffling`): example i of a split is row i of its
    files.
    """

    VERSION = _VERSION
    RELEASE_NOTES: ClassVar[dict[str, str]] = {}
    FORMAT: ClassVar[str] = ""
    DESCRIPTION: ClassVar[str] = ""
    HOMEPAGE: ClassVar[str | None] = None
    SUPERVISED_KEYS: ClassVar[tuple[str, str] | None] = None
    DIRECTORY: ClassVar[str] = ""
    SPLIT_FILES: ClassVar[dict[str, tuple[str, ...]]] = {}  # split -> files under DIRECTORY
    NAMES: ClassVar[tuple[str, ...]] = ()  # the class names of a bundled labeled data set
    KEYS: ClassVar[tuple[str, str]] = ("source", "target")  # the two sides of aligned text
    one_document = False  # See TextSource.

    def __init__(self, *, input_dir: str = "", **kwargs: Any):
        """Args: input_dir: a bundled data set's files (default `$JAXLM_DATA_DIR/DIRECTORY`)."""
        self._input_dir = input_dir
        super().__init__(**kwargs)

    @property
    def input_dir(self) -> Path:
        return Path(self._input_dir or jaxlm_data_dir() / self.DIRECTORY)

    def split_files(self) -> dict[str, tuple[str, ...]]:
        """Each split's files, in the order the format reads them."""
        return {
            split: tuple(str(self.input_dir / file) for file in files)
            for split, files in self.SPLIT_FILES.items()
        }

    @property
    def names(self) -> tuple[str, ...]:
        return self.NAMES

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict(FORMATS[self.FORMAT].features(self)),
            supervised_keys=self.SUPERVISED_KEYS,
            homepage=self.HOMEPAGE,
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        del dl_manager  # Offline: the files are local.
        read = FORMATS[self.FORMAT].examples
        splits = {}
        for split, paths in self.split_files().items():  # Each split's files checked, then read.
            for path in paths:
                if not os.path.isfile(path):
                    raise FileNotFoundError(
                        f"{self.name} file not found at {path!r}. Set $JAXLM_DATA_DIR to the"
                        f" directory holding {self.DIRECTORY}/ ({', '.join(self._file_names())})."
                    )
            check_not_empty(self.name, split, paths)
            # The first example read here, so that a split without any fails before TFDS writes
            # (TFDS's own error names neither the split's files nor why).
            examples = iter(read(self, split, paths))
            first = next(examples, None)
            if first is None:
                raise ValueError(f"{self.name}: split {split!r} has no examples: "
                                 f"{_listed(paths)} hold{'s' if len(paths) == 1 else ''} none.")
            splits[split] = enumerate(itertools.chain([first], examples))
        return splits

    def _file_names(self) -> list[str]:
        return sorted({file for files in self.SPLIT_FILES.values() for file in files})

    def _generate_examples(self) -> Iterator:  # TFDS's abstract method; see _split_generators.
        raise NotImplementedError


def check_not_empty(name: str, split: str, paths: Sequence[str]) -> None:
    """Raises ValueError, naming the data set, the split and its files, when every file of the
    split is empty (0 bytes)."""
    if paths and all(os.path.getsize(path) == 0 for path in paths):
        raise ValueError(f"{name}: split {split!r} has no examples: {_listed(paths)} "
                         f"{'is' if len(paths) == 1 else 'are'} empty.")


def _listed(paths: Sequence[str]) -> str:
    return ", ".join(repr(str(path)) for path in paths)


class JaxlmTinyShakespeare(LocalFilesBuilder):
    """Tiny Shakespeare with nanoGPT's 90/10 character split.

    Concatenating the examples of a split in index order gives the split's text
    exactly (one logical document, stored in chunks).
    """

    name = TINY_SHAKESPEARE
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "nanoGPT split, 10k-character chunks."}
    FORMAT = "text"
    DESCRIPTION = "Tiny Shakespeare (karpathy/char-rnn), split as nanoGPT does."
    HOMEPAGE = "https://github.com/karpathy/char-rnn"
    DIRECTORY = "tinyshakespeare"
    SPLIT_FILES: ClassVar[dict[str, tuple[str, ...]]] = {
        "train": ("input.txt",),
        "validation": ("input.txt",),
    }
    one_document = True


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
    """Returns the sorted files that comma-separated globs match (`**` recurses).

    Raises:
      FileNotFoundError: naming a glob that matches no file (each glob must match one at least:
        a mistyped glob among several would otherwise drop its files silently).
    """
    patterns = [_expand(p.strip()) for p in files.split(",") if p.strip()]
    if not patterns:
        raise ValueError(f'{TEXT_FILES} needs `files`, comma-separated globs such as "data/*.txt".')
    paths = set()
    for pattern in patterns:
        matched = [p for p in globlib.glob(pattern, recursive=True) if os.path.isfile(p)]
        if not matched:
            raise FileNotFoundError(f"No files match the glob {pattern!r} (files={files!r}).")
        paths.update(matched)
    return sorted(paths)


def _files_config_name(settings: list[Any], paths: Sequence[str]) -> str:
    """`files_` + a hash of `settings` and each file's path, size and modification time."""
    stats = [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths]
    key = json.dumps([*settings, stats])
    return "files_" + hashlib.sha256(key.encode()).hexdigest()[:16]


def text_files_config(files: str, val_fraction: float = 0.1) -> TextFilesConfig:
    """The builder config for the corpus that `files` (comma-separated globs) matches.

    Its name, and so its directory under the data dir, is a hash of the globs,
    `val_fraction` and each matched file's path, size and modification time.
    """
    if not 0 < val_fraction <= 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5]; got {val_fraction}.")
    paths = match_files(files)
    patterns = tuple(sorted(_expand(p.strip()) for p in files.split(",") if p.strip()))
    return TextFilesConfig(
        name=_files_config_name([patterns, val_fraction], paths),
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


class JaxlmTextFiles(LocalFilesBuilder):
    """Local text files: one file is one document (example), in sorted path order.

    With two or more files, `validation` is every k-th file (see `split_paths`).
    With one file, its characters are split 90/10 like Tiny Shakespeare and each
    split is stored in chunks of one logical document. Files that are not valid
    UTF-8 are decoded with errors='replace' (bad bytes become U+FFFD).

    Build it with `config=text_files_config(files)`; the config has no default.
    """

    name = TEXT_FILES
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "One document per file; every k-th file is validation."
    }
    FORMAT = "text"
    DESCRIPTION = "Local text files, one document per file."

    @property
    def one_document(self) -> bool:  # type: ignore[override]
        """Whether the examples are chunks of one document (a single input file)."""
        return len(self.builder_config.paths) == 1

    def split_files(self) -> dict[str, tuple[str, ...]]:
        config = self.builder_config
        if not isinstance(config, TextFilesConfig) or not config.paths:
            raise ValueError(f"{TEXT_FILES} needs config=text_files_config(files).")
        if self.one_document:
            return {"train": config.paths, "validation": config.paths}
        train, validation = split_paths(config.paths, config.val_fraction)
        return {"train": tuple(train), "validation": tuple(validation)}


class JaxlmMulti30k(LocalFilesBuilder):
    """Multi30k task 1: English-German image captions, one example per sentence pair.

    Example i of a split is line i of its raw `.en` and `.de` files (raw text: not tokenized, not
    lower-cased).
    """

    name = MULTI30K
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Task 1 train (29,000 pairs) and validation (1,014), raw text."
    }
    FORMAT = "aligned"
    DESCRIPTION = "Multi30k task 1 (Elliott et al. 2016), English-German, raw text."
    HOMEPAGE = "https://github.com/multi30k/dataset"
    DIRECTORY = "multi30k"
    SPLIT_FILES: ClassVar[dict[str, tuple[str, ...]]] = {
        "train": ("train.en.gz", "train.de.gz"),
        "validation": ("val.en.gz", "val.de.gz"),
    }
    KEYS = ("en", "de")


@dataclasses.dataclass(eq=False)
class ParallelTextConfig(tfds.core.BuilderConfig):
    """Two line-aligned local files; build it with `parallel_text_config`.

    Attributes:
      source_path: the source sentences, one per line (absolute path).
      target_path: their translations, line by line (absolute path).
    """

    source_path: str = ""
    target_path: str = ""


def parallel_text_config(files: str) -> ParallelTextConfig:
    """The builder config for `files='SOURCE_FILE,TARGET_FILE'` (plain or .gz).

    Its name, and so its directory under the data dir, is a hash of both files' paths, sizes and
    modification times.
    """
    paths = [_expand(p.strip()) for p in files.split(",") if p.strip()]
    if len(paths) != 2:
        raise ValueError(
            f'{PARALLEL_TEXT} needs files="SOURCE_FILE,TARGET_FILE" (two files); got {files!r}.'
        )
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Parallel text file not found: {path!r} (files={files!r}).")
    return ParallelTextConfig(
        name=_files_config_name([PARALLEL_TEXT], paths),
        description=f"{paths[0]} -> {paths[1]}",
        source_path=paths[0],
        target_path=paths[1],
    )


class JaxlmParallelText(LocalFilesBuilder):
    """Two local line-aligned files: example i is (line i of the source, line i of the target).

    One split, `train`; carve validation out with TFDS slicing (e.g. 'train[-1000:]') or give
    another pair of files. Build it with `config=parallel_text_config(files)`.
    """

    name = PARALLEL_TEXT
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "One example per line pair."}
    FORMAT = "aligned"
    DESCRIPTION = "Local parallel text, one sentence pair per line."

    def split_files(self) -> dict[str, tuple[str, ...]]:
        config = self.builder_config
        if not isinstance(config, ParallelTextConfig) or not config.source_path:
            raise ValueError(f"{PARALLEL_TEXT} needs config=parallel_text_config(files).")
        return {"train": (config.source_path, config.target_path)}


@dataclasses.dataclass(eq=False)
class LabeledFilesConfig(tfds.core.BuilderConfig):
    """Local labeled files, one per split; build it with `labeled_files_config`.

    Attributes:
      files: (split, absolute path) pairs, sorted by split.
      names: the class (or tag) names, read from the train file.
    """

    files: tuple[tuple[str, str], ...] = ()
    names: tuple[str, ...] = ()


def files_per_split(name: str, files: str) -> dict[str, str]:
    """{split: absolute path} of `files='train=PATH,validation=PATH'` (one file per split, a train
    file required); errors name `name`, the setting and the missing file."""
    splits: dict[str, str] = {}
    for item in filter(None, (item.strip() for item in files.split(","))):
        split, _, path = (part.strip() for part in item.partition("="))
        if not re.fullmatch(r"\w+", split) or not path or split in splits:
            raise ValueError(
                f'{name} needs files="train=PATH,validation=PATH" (one file per split, each'
                f" split once); got {files!r}."
            )
        splits[split] = _expand(path)
        if not os.path.isfile(splits[split]):
            raise FileNotFoundError(f"{name} file not found: {splits[split]!r} (files={files!r}).")
    if "train" not in splits:
        raise ValueError(f'{name} needs a train file, files="train=PATH,..."; got {files!r}.')
    return splits


def labeled_files_config(name: str, files: str) -> LabeledFilesConfig:
    """The builder config of `jaxlm_tsv` or `jaxlm_conll` for `files='train=PATH,SPLIT=PATH'`.

    A `train` file is required: its labels (tags) name the classes. The config's name, and so
    its directory under the data dir, is a hash of the splits and the files' paths, sizes and
    modification times.
    """
    splits = files_per_split(name, files)
    check_not_empty(name, "train", [splits["train"]])
    if name == TSV:
        labels = readers.read_tsv(splits["train"])[1]
    else:
        labels = readers.read_conll(splits["train"])
    if not labels:  # No names to read from it (the other splits are checked as they are read).
        raise ValueError(f"{name}: split 'train' has no examples: {splits['train']!r} holds none.")
    names = readers.tsv_label_names(labels) if name == TSV else readers.conll_tag_names(labels)
    items = tuple(sorted(splits.items()))
    return LabeledFilesConfig(
        name=_files_config_name([name, [split for split, _ in items]], [p for _, p in items]),
        description=", ".join(f"{split}={path}" for split, path in items),
        files=items,
        names=tuple(names),
    )


class _LabeledBuilder(LocalFilesBuilder, skip_registration=True):
    """Labeled local files, one per split, one example per row (sentence) in file order.

    Bundled data sets name their files in `SPLIT_FILES` and their classes in `NAMES`; the
    others take both from a `LabeledFilesConfig`.
    """

    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "One example per row, in file order."}

    def split_files(self) -> dict[str, tuple[str, ...]]:
        if self.SPLIT_FILES:
            return super().split_files()
        return {split: (path,) for split, path in self._files_config().files}

    @property
    def names(self) -> tuple[str, ...]:
        return self.NAMES or self._files_config().names

    def _files_config(self) -> LabeledFilesConfig:
        config = self.builder_config
        if not isinstance(config, LabeledFilesConfig) or not config.files:
            raise ValueError(
                f"{self.name} needs config=labeled_files_config({self.name!r}, files)."
            )
        return config


class JaxlmSst2(_LabeledBuilder):
    """GLUE SST-2: binary sentiment of movie-review sentences (lower-cased, tokenized)."""

    name = SST2
    FORMAT = "tsv"
    DESCRIPTION = "GLUE SST-2: binary sentiment of movie-review sentences (lower-cased, tokenized)."
    DIRECTORY = "sst2"
    SPLIT_FILES: ClassVar[dict[str, tuple[str, ...]]] = {
        "train": ("train.tsv",),
        "validation": ("dev.tsv",),
    }
    NAMES = SST2_LABELS


class JaxlmTsv(_LabeledBuilder):
    """Local sentence-classification TSV files (see `readers.read_tsv`), one per split.

    Build it with `config=labeled_files_config(TSV, files)`.
    """

    name = TSV
    FORMAT = "tsv"
    DESCRIPTION = "Local sentence-classification TSV files (see `read_tsv`), one per split."


class JaxlmConll2003(_LabeledBuilder):
    """CoNLL-2003 English named entities, IOB2 tags over PER, ORG, LOC and MISC."""

    name = CONLL2003
    FORMAT = "conll"
    DESCRIPTION = "CoNLL-2003 English named entities, IOB2 tags over PER, ORG, LOC and MISC."
    DIRECTORY = "conll2003"
    SPLIT_FILES: ClassVar[dict[str, tuple[str, ...]]] = {
        "train": ("train.txt",),
        "validation": ("valid.txt",),
    }
    NAMES = CONLL_TAGS


class JaxlmConll(_LabeledBuilder):
    """Local CoNLL token-tagging files (see `readers.read_conll`), one per split.

    Build it with `config=labeled_files_config(CONLL, files)`.
    """

    name = CONLL
    FORMAT = "conll"
    DESCRIPTION = "Local CoNLL token-tagging files (see `read_conll`), one per split."


class _IdxImages(LocalFilesBuilder, skip_registration=True):
    """28x28 grey images in 10 classes from IDX files (LeCun's format and file names)."""

    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "IDX files as uint8 tensors, in file order."
    }
    FORMAT = "idx"
    SUPERVISED_KEYS = ("image", "label")
    SPLIT_FILES: ClassVar[dict[str, tuple[str, ...]]] = {
        split: (f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz")
        for split, prefix in {"train": "train", "test": "t10k"}.items()
    }


class JaxlmMnist(_IdxImages):
    """MNIST handwritten digits from `$JAXLM_DATA_DIR/mnist`."""

    name = MNIST
    DESCRIPTION = "mnist from its IDX files (LeCun's format and file names)."
    HOMEPAGE = "http://yann.lecun.com/exdb/mnist/"
    DIRECTORY = "mnist"


class JaxlmFashionMnist(_IdxImages):
    """Fashion-MNIST (Zalando) from `$JAXLM_DATA_DIR/fashion_mnist`."""

    name = FASHION_MNIST
    DESCRIPTION = "fashion_mnist from its IDX files (LeCun's format and file names)."
    HOMEPAGE = "https://github.com/zalandoresearch/fashion-mnist"
    DIRECTORY = "fashion_mnist"


_BUILDERS: dict[str, type[LocalFilesBuilder]] = {
    builder.name: builder
    for builder in (
        JaxlmTinyShakespeare,
        JaxlmTextFiles,
        JaxlmMulti30k,
        JaxlmParallelText,
        JaxlmSst2,
        JaxlmTsv,
        JaxlmConll2003,
        JaxlmConll,
        JaxlmMnist,
        JaxlmFashionMnist,
    )
}


def _feature_text(example: dict[str, Any], key: str, setting: str) -> str:
    """The text of feature `key` of `example`; a missing key names the `setting` to change."""
    try:
        value = example[key]
    except KeyError:
        raise KeyError(
            f"Examples have no feature {key!r}; features: {sorted(example)}. Set {setting}."
        ) from None
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


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
        return _feature_text(example, self.text_key, "text_key")

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


class PairSource(Sequence[tuple[str, str]]):
    """The (source, target) sentence pairs of one split, over a TFDS data source.

    Attributes:
      key: identifies the data (the prepared directory, or the catalog name and data dir; the
        split; the two keys): equal keys mean equal pairs, so that encodings can be cached across
        `get_pairs` calls.
    """

    def __init__(self, source: Any, *, source_key: str, target_key: str, key: tuple = ()):
        self.source = source
        self.source_key = source_key
        self.target_key = target_key
        self.key = key

    def __len__(self) -> int:
        return len(self.source)

    def _pair(self, example: dict[str, Any]) -> tuple[str, str]:
        return (
            _feature_text(example, self.source_key, "source_key"),
            _feature_text(example, self.target_key, "target_key"),
        )

    def __getitem__(self, index: int) -> tuple[str, str]:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} pairs")
        return self._pair(self.source[index % len(self)])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[str, str]]:
        return [self._pair(e) for e in self.source.__getitems__(list(indices))]

    def iter_pairs(self, batch_size: int = 1024) -> Iterator[tuple[str, str]]:
        """Yields the pairs in order, reading `batch_size` at a time."""
        for start in range(0, len(self), batch_size):
            yield from self.__getitems__(range(start, min(start + batch_size, len(self))))


def check_split(name: str, split: str, builder: tfds.core.DatasetBuilder) -> None:
    """Raises ValueError, listing the splits, for a plain split name that `builder` lacks."""
    available = sorted(builder.info.splits.keys())
    if re.fullmatch(r"\w+", split) and split not in available:
        raise ValueError(
            f"Unknown split {split!r} of {name}; available splits: {', '.join(available)}."
        )


def builder_config(name: str, files: str = "", val_fraction: float = 0.1) -> Any:
    """The builder config of `name` for its `files` (None for the bundled data sets)."""
    if name == TEXT_FILES:
        return text_files_config(files, val_fraction)
    if name == PARALLEL_TEXT:
        return parallel_text_config(files)
    if name in (TSV, CONLL):
        return labeled_files_config(name, files)
    return None


def make_builder(
    name: str, *, data_dir: str = "", files: str = "", val_fraction: float = 0.1,
    input_dir: str = "",
) -> tfds.core.DatasetBuilder:
    """The jaxlm builder `name`, not prepared (its `info` gives the features).

    `input_dir` overrides where a bundled data set's files are read from when preparing.
    """
    if name not in _BUILDERS:
        raise ValueError(f"{name!r} is not a jaxlm builder ({', '.join(_BUILDERS)}).")
    config = builder_config(name, files, val_fraction)
    return _BUILDERS[name](
        input_dir=input_dir,
        data_dir=tfds_data_dir(data_dir),
        file_format="array_record",
        **({} if config is None else {"config": config}),
    )


def get_builder(
    name: str, *, data_dir: str = "", files: str = "", val_fraction: float = 0.1,
    input_dir: str = "",
) -> tfds.core.DatasetBuilder:
    """Returns the prepared jaxlm builder `name` (preparing it on first use)."""
    if name not in _BUILDERS:
        raise ValueError(f"{name!r} is not a jaxlm builder ({', '.join(_BUILDERS)}).")
    return prepared(
        lambda: make_builder(
            name, data_dir=data_dir, files=files, val_fraction=val_fraction, input_dir=input_dir
        ),
        name,
        data_dir,
    )


def prepared(
    make: Callable[[], tfds.core.DatasetBuilder], name: str, data_dir: str = ""
) -> tfds.core.DatasetBuilder:
    """`make()`'s builder, prepared by one process at a time in `data_dir`.

    Without the lock, two processes preparing at once both write and the second rename fails
    (`FileExistsError`). The builder is made inside the lock so that a process which waited
    reads the prepared data's info rather than the empty info it would have seen before.
    """
    directory = tfds_data_dir(data_dir)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f".{name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        builder = make()
        builder.download_and_prepare()  # Returns at once when prepared already.
    return builder


def _prepared_split(
    name: str, split: str, *, data_dir: str, files: str, **keys: str
) -> tuple[tfds.core.DatasetBuilder, Any]:
    """Prepares jaxlm builder `name`; returns it and its data source of `split`.

    `keys` maps each argument that names a feature (e.g. text_key='text') to its value; each must
    be a feature of the data set.
    """
    builder = get_builder(name, data_dir=data_dir, files=files)
    check_split(name, split, builder)
    features = sorted(builder.info.features.keys())
    for setting, key in keys.items():
        if key not in features:
            raise ValueError(
                f"{name} has the features {', '.join(features)}, not {key!r}; set {setting}."
            )
    return builder, builder.as_data_source(split=split)


def check_files(name: str, files: str) -> None:
    """Raises ValueError when `files` is given to a builder that does not read it."""
    if files and name not in FILES_BUILDERS:
        raise ValueError(
            f"`files` is only used with {', '.join(FILES_BUILDERS)}, not with {name!r}."
        )


def get_source(
    name: str, split: str, *, data_dir: str = "", files: str = "", text_key: str = "text"
) -> TextSource:
    """Returns the documents of `split` of data set `name` as strings.

    Args:
      name: a jaxlm builder (`jaxlm_tiny_shakespeare`, `jaxlm_text_files`, or one side of
        `jaxlm_multi30k` or `jaxlm_parallel_text` chosen by `text_key`) or a TFDS catalog name
        (with optional `/config:version`).
      split: e.g. 'train' or 'validation' (TFDS slicing such as 'train[:10%]' works).
      data_dir: where prepared data lives (default `$TFDS_DATA_DIR`, else
        `~/tensorflow_datasets`).
      files: for `jaxlm_text_files`, comma-separated globs of text files; for
        `jaxlm_parallel_text`, 'SOURCE_FILE,TARGET_FILE'.
      text_key: the text feature ('text'; 'en' or 'de' of Multi30k; 'source' or 'target' of
        parallel text; any feature of a catalog data set).

    Returns:
      A `TextSource`: `len`, `[i]` and `__getitems__` give `str` documents.
    """
    check_files(name, files)
    if name in JAXLM_BUILDERS:
        builder, source = _prepared_split(
            name, split, data_dir=data_dir, files=files, text_key=text_key
        )
        return TextSource(source, text_key=text_key, one_document=builder.one_document)
    source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=True)
    return TextSource(source, text_key=text_key)


def get_pairs(
    name: str,
    split: str,
    *,
    source_key: str,
    target_key: str,
    data_dir: str = "",
    files: str = "",
) -> PairSource:
    """Returns the (source, target) sentence pairs of `split` of a parallel corpus.

    Args:
      name: `jaxlm_multi30k` (keys 'en', 'de'), `jaxlm_parallel_text` (keys 'source', 'target')
        or a TFDS catalog name such as 'wmt14_translate/de-en' (keys 'en', 'de').
      split: e.g. 'train' or 'validation' (TFDS slicing such as 'train[:1000]' works).
      source_key: the feature translated from.
      target_key: the feature translated to.
      data_dir: where prepared data lives (see `get_source`).
      files: for `jaxlm_parallel_text`, 'SOURCE_FILE,TARGET_FILE' (plain or .gz).

    Returns:
      A `PairSource`: `len`, `[i]` and `__getitems__` give `(source, target)` strings.
    """
    check_files(name, files)
    keys = {"source_key": source_key, "target_key": target_key}
    if name in JAXLM_BUILDERS:
        builder, source = _prepared_split(name, split, data_dir=data_dir, files=files, **keys)
        key = (str(builder.data_dir), split)
    else:
        source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=True)
        key = (name, tfds_data_dir(data_dir), split)
    return PairSource(source, **keys, key=key + (source_key, target_key))
