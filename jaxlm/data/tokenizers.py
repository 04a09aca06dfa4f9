"""Tokenizers: char, byte and sentencepiece behind one small interface.

Every tokenizer has `vocab_size`, `eos_id` (None when it has no EOS token),
`bos_id`, `pad_id`, `encode(text) -> np.ndarray[int32]`, `decode(ids) -> str`
and `save(directory)`. A run saves its tokenizer into `WORKDIR/tokenizer/`
(a `tokenizer.json` with the kind and vocabulary, plus the sentencepiece
`.model` file when there is one), so that generation can rebuild it from the
workdir alone:

  tok = tokenizers.create('char', texts=[train_text])
  tok.save(workdir / 'tokenizer')
  tok = tokenizers.load(workdir / 'tokenizer')
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

KINDS = ("char", "byte", "sentencepiece")
CONFIG_FILE = "tokenizer.json"
SENTENCEPIECE_FILE = "sentencepiece.model"


class Tokenizer(abc.ABC):
    """The interface shared by all tokenizers."""

    kind: str = ""
    vocab_size: int
    eos_id: int | None = None
    bos_id: int | None = None
    pad_id: int | None = None

    @abc.abstractmethod
    def encode(self, text: str) -> np.ndarray:
        """Returns the token ids of `text` as an int32 array."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Returns the text of token `ids`."""

    @abc.abstractmethod
    def save(self, directory: str | os.PathLike[str]) -> None:
        """Writes the tokenizer into `directory` (created if missing)."""

    @property
    @abc.abstractmethod
    def fingerprint(self) -> str:
        """A short string that changes whenever the id mapping changes (a cache key)."""


def _write_atomic(path: Path, data: bytes) -> None:
    # Write then rename, so that processes saving the same tokenizer at once, or
    # a crash mid-write, never leave a half-written file behind.
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_config(directory: str | os.PathLike[str], config: dict) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _write_atomic(
        directory / CONFIG_FILE, json.dumps(config, ensure_ascii=False, indent=1).encode("utf-8")
    )
    return directory


def _as_id_array(ids: Sequence[int] | np.ndarray, vocab_size: int) -> np.ndarray:
    """`ids` as a flat int array; raises unless every id is in [0, vocab_size)."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(
            f"Token ids must be in [0, {vocab_size}); got min {ids.min()}, max {ids.max()}."
        )
    return ids


class CharTokenizer(Tokenizer):
    """One id per character; ids are indices into the sorted character set.

    This is exactly nanoGPT's shakespeare_char: `chars = sorted(set(data))`,
    `stoi = {c: i for i, c in enumerate(chars)}`. There is no EOS token.
    Encoding is vectorised (UTF-32 code points + `np.searchsorted`), so a
    megabyte of text takes milliseconds.
    """

    kind = "char"

    def __init__(self, chars: Iterable[str]):
        chars = sorted(set(chars))
        if not chars:
            raise ValueError("CharTokenizer needs a non-empty character set.")
        if any(len(c) != 1 for c in chars):
            raise ValueError("CharTokenizer vocabulary entries must be single characters.")
        self.chars = chars
        self.vocab_size = len(chars)
        # Sorting str by `<` is sorting by code point, so `_codepoints` is sorted too.
        self._codepoints = np.array([ord(c) for c in chars], dtype=np.uint32)
        self._chars_array = np.array(chars)

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> CharTokenizer:
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        return cls(chars)

    def encode(self, text: str) -> np.ndarray:
        """Encodes `text`; raises ValueError naming the first unknown character."""
        codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = np.searchsorted(self._codepoints, codepoints)
        ids_clipped = np.minimum(ids, self.vocab_size - 1)
        unknown = self._codepoints[ids_clipped] != codepoints
        if unknown.any():
            position = int(np.argmax(unknown))
            raise ValueError(
                f"Character {text[position]!r} (U+{ord(text[position]):04X}) at position"
                f" {position} is not in the char vocabulary of {self.vocab_size}"
                " characters (built from the training text)."
            )
        return ids.astype(np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        ids = _as_id_array(ids, self.vocab_size)
        return "".join(self._chars_array[ids].tolist())

    def save(self, directory: str | os.PathLike[str]) -> None:
        _write_config(directory, {"kind": self.kind, "vocab": self.chars})

    @property
    def fingerprint(self) -> str:
        return "char-" + hashlib.sha256("".join(self.chars).encode()).hexdigest()[:16]


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes 0..255 plus EOS = 256 (vocab 257).

    Any text encodes. Decoding drops the EOS id and replaces invalid UTF-8
    (e.g. a sequence cut in the middle of a character) with U+FFFD.
    """

    kind = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        ids = _as_id_array(ids, self.vocab_size)
        return ids[ids != self.eos_id].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def save(self, directory: str | os.PathLike[str]) -> None:
        _write_config(directory, {"kind": self.kind})

    @property
    def fingerprint(self) -> str:
        return "byte"


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model (`tools/train_tokenizer.py` trains one).

    Special ids come from the model; an id that the model disables (-1) is
    None here.
    """

    kind = "sentencepiece"

    def __init__(self, model_path: str | os.PathLike[str]):
        import sentencepiece as spm  # pylint: disable=g-import-not-at-top

        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise FileNotFoundError(
                f"Sentencepiece model file not found: {str(self.model_path)!r}."
                " Train one with tools/train_tokenizer.py."
            )
        self._model_bytes = self.model_path.read_bytes()
        self._sp = spm.SentencePieceProcessor(model_proto=self._model_bytes)
        self.vocab_size = self._sp.get_piece_size()
        self.eos_id = self._special(self._sp.eos_id())
        self.bos_id = self._special(self._sp.bos_id())
        self.pad_id = self._special(self._sp.pad_id())

    @staticmethod
    def _special(i: int) -> int | None:
        return None if i < 0 else int(i)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), dtype=np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._sp.decode(_as_id_array(ids, self.vocab_size).tolist())

    def save(self, directory: str | os.PathLike[str]) -> None:
        directory = _write_config(directory, {"kind": self.kind, "model_file": SENTENCEPIECE_FILE})
        target = directory / SENTENCEPIECE_FILE
        if not (target.exists() and target.resolve() == self.model_path.resolve()):
            _write_atomic(target, self._model_bytes)

    @property
    def fingerprint(self) -> str:
        return "sp-" + hashlib.sha256(self._model_bytes).hexdigest()[:16]


def create(kind: str, *, texts: Iterable[str] | None = None, model_path: str = "") -> Tokenizer:
    """Creates a tokenizer.

    Args:
      kind: one of KINDS: 'char', 'byte', 'sentencepiece'.
      texts: for 'char', the texts whose character set is the vocabulary.
      model_path: for 'sentencepiece', the `.model` file.

    Returns:
      The tokenizer.
    """
    if kind == "char":
        if texts is None:
            raise ValueError("Tokenizer kind 'char' needs `texts` to build its vocabulary from.")
        return CharTokenizer.from_texts(texts)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "sentencepiece":
        if not model_path:
            raise ValueError("Tokenizer kind 'sentencepiece' needs `model_path` (a .model file).")
        return SentencePieceTokenizer(model_path)
    raise ValueError(f"Unknown tokenizer kind {kind!r}; valid kinds: {', '.join(KINDS)}.")


def save(tokenizer: Tokenizer, directory: str | os.PathLike[str]) -> None:
    """Writes `tokenizer` into `directory` (e.g. `WORKDIR/tokenizer`)."""
    tokenizer.save(directory)


def exists(directory: str | os.PathLike[str]) -> bool:
    """Whether `directory` holds a saved tokenizer."""
    return (Path(directory) / CONFIG_FILE).is_file()


def load(directory: str | os.PathLike[str]) -> Tokenizer:
    """Loads a tokenizer written by `save` from `directory`."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"No saved tokenizer: {str(path)!r} does not exist.")
    config = json.loads(path.read_text())
    kind = config.get("kind")
    if kind == "char":
        return CharTokenizer(config["vocab"])
    if kind == "byte":
        return ByteTokenizer()
    if kind == "sentencepiece":
        return SentencePieceTokenizer(Path(directory) / config["model_file"])
    raise ValueError(
        f"{str(path)!r} names unknown tokenizer kind {kind!r}; valid kinds: {', '.join(KINDS)}."
    )
