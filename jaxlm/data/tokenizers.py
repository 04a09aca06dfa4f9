"""Tokenizers: char, byte, sentencepiece, BERT wordpiece and Hugging Face `tokenizer.json`
behind one small interface.

Every tokenizer has `vocab_size`, the special ids `eos_id`, `bos_id`, `pad_id`,
`cls_id`, `sep_id`, `mask_id`, `unk_id` (None when it has no such token),
`encode(text) -> np.ndarray[int32]`, `decode(ids) -> str`, `word_starts(ids)`
and `save(directory)`. A run saves its tokenizer into `WORKDIR/tokenizer/`
(a `tokenizer.json` with the kind and vocabulary, plus the sentencepiece
`.model`, wordpiece `vocab.txt` or Hugging Face `hf_tokenizer.json` file when
there is one), so that generation can rebuild it from the workdir alone:

  tok = tokenizers.create('char', texts=[train_text])
  tok.save(workdir / 'tokenizer')
  tok = tokenizers.load(workdir / 'tokenizer')

`build_tokenizer(kind, workdir=..., name=...)` does both for a run: it loads
`WORKDIR/tokenizer`, or creates the tokenizer (a 'char' vocabulary from a data set's
split) and saves it there.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

KINDS = ("char", "byte", "sentencepiece", "wordpiece", "huggingface")
CONFIG_FILE = "tokenizer.json"
SENTENCEPIECE_FILE = "sentencepiece.model"
WORDPIECE_FILE = "vocab.txt"
HF_TOKENIZER_FILE = "hf_tokenizer.json"  # not tokenizer.json: that name is CONFIG_FILE here
TOKENIZER_DIR = "tokenizer"  # WORKDIR/TOKENIZER_DIR holds a run's tokenizer


class Tokenizer(abc.ABC):
    """The interface shared by all tokenizers."""

    kind: str = ""
    vocab_size: int
    eos_id: int | None = None
    bos_id: int | None = None
    pad_id: int | None = None
    cls_id: int | None = None
    sep_id: int | None = None
    mask_id: int | None = None
    unk_id: int | None = None
    chat_template: str = ""  # a checkpoint's jinja chat template (Hugging Face tokenizers)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The ids that end generation: EOS, when the tokenizer has one."""
        return () if self.eos_id is None else (self.eos_id,)

    @abc.abstractmethod
    def encode(self, text: str) -> np.ndarray:
        """Returns the token ids of `text` as an int32 array."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Returns the text of token `ids`."""

    def word_starts(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Whether each token starts a word (whole-word masking); here every token does."""
        return np.ones(np.shape(ids), dtype=bool)

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


# BERT's "Chinese character" blocks (CJK Unified Ideographs and extensions, compatibility
# ideographs); the English vocabularies hold some of them as single-character tokens.
_CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)
MAX_WORD_CHARS = 100  # Longer words encode as [UNK], as in BERT.
_WORD_CACHE_SIZE = 1 << 20


def _is_punctuation(char: str) -> bool:
    cp = ord(char)
    # BERT counts every non-alphanumeric printable ASCII character as punctuation,
    # including "$", "^", "`" and "+", which Unicode calls symbols.
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(char).startswith("P")


def _clean_char(char: str) -> str:
    """BERT's cleanup of one character: control and invalid characters go, whitespace becomes
    a space, CJK characters get spaces around them (so each is a word)."""
    cp = ord(char)
    if cp in (0, 0xFFFD) or (char not in "\t\n\r" and unicodedata.category(char)[0] == "C"):
        return ""
    if char.isspace():
        return " "
    if any(lo <= cp <= hi for lo, hi in _CJK_RANGES):
        return f" {char} "
    return char


def _lower_char(char: str) -> str:
    """Lower-cases one character of NFD text and drops combining marks (accents).

    Per character, like Hugging Face's normalizer (so a final sigma stays sigma)."""
    return "" if unicodedata.category(char) == "Mn" else char.lower()


def _split_punctuation_char(char: str) -> str:
    return f" {char} " if _is_punctuation(char) else char


class _CharTable(dict):
    """A `str.translate` table that maps each character by `fn`, computed on first sight."""

    def __init__(self, fn: Callable[[str], str]):
        super().__init__()
        self._fn = fn

    def __missing__(self, cp: int) -> str:
        self[cp] = value = self._fn(chr(cp))
        return value


_CLEAN = _CharTable(_clean_char)
_LOWER = _CharTable(_lower_char)
_SPLIT_PUNCTUATION = _CharTable(_split_punctuation_char)


def _vocab_lines(text: str) -> list[str]:
    # Split like Python's text-mode `readlines()`, as Hugging Face reads vocab.txt: on
    # newlines only; `str.splitlines` would also split on characters such as U+2028.
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return lines[:-1] if lines[-1] == "" else lines


class WordPieceTokenizer(Tokenizer):
    """BERT's WordPiece tokenizer; ids equal Hugging Face `BertTokenizer`'s.

    Basic tokenization (cleanup, lower-casing and accent stripping when
    `lower_case`, punctuation and CJK characters split off) then greedy
    longest-match-first word pieces, continuations prefixed with '##'.
    `encode` adds no [CLS]/[SEP]; unlike Hugging Face it also never reads
    special tokens such as '[MASK]' out of the text (that is '[', 'mask', ']'),
    so no text can inject structure into a pretraining example.
    """

    kind = "wordpiece"

    def __init__(self, vocab_path: str | os.PathLike[str], *, lower_case: bool = True):
        self.vocab_path = Path(vocab_path)
        if not self.vocab_path.is_file():
            raise FileNotFoundError(
                f"WordPiece vocabulary file not found: {str(self.vocab_path)!r}. Pass the"
                " vocab.txt of a BERT checkpoint (one token per line)."
            )
        self.lower_case = lower_case
        self._vocab_bytes = self.vocab_path.read_bytes()
        self.pieces = _vocab_lines(self._vocab_bytes.decode("utf-8"))
        self._ids = {piece: i for i, piece in enumerate(self.pieces)}
        if "[UNK]" not in self._ids:
            raise ValueError(f"WordPiece vocabulary {str(self.vocab_path)!r} has no '[UNK]' token.")
        self.vocab_size = len(self.pieces)
        self.unk_id = self._ids["[UNK]"]
        self.cls_id = self._ids.get("[CLS]")
        self.sep_id = self._ids.get("[SEP]")
        self.mask_id = self._ids.get("[MASK]")
        self.pad_id = self._ids.get("[PAD]")
        self._continuation = np.array([p.startswith("##") for p in self.pieces], dtype=bool)
        self._word_cache: dict[str, tuple[int, ...]] = {}

    def _words(self, text: str) -> list[str]:
        text = text.translate(_CLEAN)
        if self.lower_case:
            text = unicodedata.normalize("NFD", text).translate(_LOWER)
        return text.translate(_SPLIT_PUNCTUATION).split()

    def _word_pieces(self, word: str) -> tuple[int, ...]:
        if len(word) > MAX_WORD_CHARS:
            return (self.unk_id,)
        ids = []
        start = 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self._ids:
                    ids.append(self._ids[piece])
                    start = end
                    break
            else:
                return (self.unk_id,)
        return tuple(ids)

    def _word_ids(self, word: str) -> tuple[int, ...]:
        ids = self._word_cache.get(word)
        if ids is None:
            ids = self._word_pieces(word)
            if len(self._word_cache) < _WORD_CACHE_SIZE:
                self._word_cache[word] = ids
        return ids

    def encode(self, text: str) -> np.ndarray:
        ids = [i for word in self._words(text) for i in self._word_ids(word)]
        return np.asarray(ids, dtype=np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        ids = _as_id_array(ids, self.vocab_size)
        pieces = [self.pieces[i] for i in ids.tolist() if i != self.pad_id]
        return " ".join(pieces).replace(" ##", "").strip()

    def word_starts(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """True where a token starts a word (does not begin with '##')."""
        return ~self._continuation[_as_id_array(ids, self.vocab_size)]

    def save(self, directory: str | os.PathLike[str]) -> None:
        config = {"kind": self.kind, "vocab_file": WORDPIECE_FILE, "lower_case": self.lower_case}
        target = _write_config(directory, config) / WORDPIECE_FILE
        if not (target.exists() and target.resolve() == self.vocab_path.resolve()):
            _write_atomic(target, self._vocab_bytes)

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256(self._vocab_bytes + bytes([self.lower_case])).hexdigest()[:16]
        return "wordpiece-" + digest


# The usual spellings of special tokens in Hugging Face `tokenizer.json` files, first match wins.
_HF_SPECIALS = {
    "eos_id": ("<|endoftext|>", "</s>"),
    "bos_id": ("<s>", "<|endoftext|>"),
    "pad_id": ("<pad>", "[PAD]"),
    "unk_id": ("<unk>", "[UNK]"),
    "cls_id": ("[CLS]",),
    "sep_id": ("[SEP]",),
    "mask_id": ("[MASK]", "<mask>"),
}


class HuggingFaceTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` (e.g. GPT-2's byte-level BPE), run by the `tokenizers`
    package, with the checkpoint's chat template and special tokens.

    `encode` adds no special tokens. BOS and EOS are the tokens the folder's
    `tokenizer_config.json` names; other special ids (and BOS/EOS without one) are the
    vocabulary's tokens with the usual spellings (`<|endoftext|>` or `</s>` is EOS, ...); None
    where it has none. `settings` (`hf_settings`: chat template, BOS/EOS, the ids that end a
    turn) come from the files beside a Hugging Face `tokenizer.json`, or from a saved workdir.
    """

    kind = "huggingface"

    def __init__(self, path: str | os.PathLike[str], settings: dict | None = None):
        try:
            import tokenizers as hf_tokenizers  # pylint: disable=g-import-not-at-top
        except ImportError as e:
            raise ImportError(
                "Tokenizer kind 'huggingface' needs the `tokenizers` package (pip install tokenizers)."
            ) from e
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(
                f"Hugging Face tokenizer file not found: {str(self.path)!r} (a tokenizer.json)."
            )
        self._json_bytes = self.path.read_bytes()
        self._tokenizer = hf_tokenizers.Tokenizer.from_str(self._json_bytes.decode("utf-8"))
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.settings = hf_settings(self.path.parent) if settings is None else settings
        for attribute, spellings in _HF_SPECIALS.items():
            named = self.settings.get(attribute.replace("_id", "_token"))
            ids = (self._tokenizer.token_to_id(token) for token in ((named,) if named else spellings))
            setattr(self, attribute, next((i for i in ids if i is not None), None))

    @property
    def chat_template(self) -> str:
        """The jinja chat template ('' when the checkpoint has none)."""
        return self.settings.get("chat_template", "")

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The ids that end an assistant turn: EOS and those generation_config.json adds."""
        ids = [self.eos_id, *self.settings.get("stop_ids", ())]
        return tuple(dict.fromkeys(i for i in ids if i is not None))

    def encode(self, text: str) -> np.ndarray:
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return np.asarray(ids, dtype=np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._tokenizer.decode(_as_id_array(ids, self.vocab_size).tolist())

    def save(self, directory: str | os.PathLike[str]) -> None:
        config = {"kind": self.kind, "tokenizer_file": HF_TOKENIZER_FILE, "settings": self.settings}
        target = _write_config(directory, config) / HF_TOKENIZER_FILE
        if not (target.exists() and target.resolve() == self.path.resolve()):
            _write_atomic(target, self._json_bytes)

    @property
    def fingerprint(self) -> str:
        return "hf-" + hashlib.sha256(self._json_bytes).hexdigest()[:16]


def hf_settings(folder: str | os.PathLike[str]) -> dict:
    """What a Hugging Face folder says about its tokenizer beyond tokenizer.json: the chat
    template (`chat_template.jinja`, else tokenizer_config.json's, the 'default' of a named
    list), `bos_token` and `eos_token`, and generation_config.json's EOS ids (`stop_ids`)."""
    folder = Path(folder)
    read = lambda name: json.loads((folder / name).read_text()) if (folder / name).is_file() else {}
    config, generation = read("tokenizer_config.json"), read("generation_config.json")
    template = config.get("chat_template") or ""
    if isinstance(template, list):
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default", next(iter(named.values()), ""))
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    content = lambda token: token.get("content") if isinstance(token, dict) else token
    stops = generation.get("eos_token_id")
    return {"chat_template": template, "bos_token": content(config.get("bos_token")),
            "eos_token": content(config.get("eos_token")),
            "stop_ids": [stops] if isinstance(stops, int) else list(stops or [])}


def train_sentencepiece(
    texts: Iterable[str],
    *,
    vocab_size: int,
    path: str | os.PathLike[str],
    model_type: str = "unigram",
    keep_whitespace: bool = False,
    character_coverage: float = 0.9995,
    input_sentence_size: int = 0,
    num_threads: int = 0,
) -> str:
    """Trains a sentencepiece model with jaxlm's special ids and returns its `.model` path.

    Special ids: pad=0, eos=1, unk=2, bos=3 (pad 0 so that zero-padded batches are padding).
    No normalization, so decoding gives back the text itself; byte fallback, so any text
    encodes (the specials and the 256 byte pieces count towards `vocab_size`).

    Args:
      texts: the training sentences or lines, one per item.
      vocab_size: the vocabulary size, specials and byte pieces included.
      path: the `.model` file to write (".model" is appended when missing; a `.vocab` file is
        written beside it).
      model_type: 'unigram' or 'bpe'.
      keep_whitespace: lossless for text where layout matters (code, a language model's
        corpus): no collapsing of spaces, no dummy prefix, whitespace-only pieces, so that
        decode(encode(text)) == text with newlines and indentation. Without it a dummy prefix
        gives a sentence's first word the same pieces as the others (sentence-level data).
      character_coverage: fraction of characters that get their own piece.
      input_sentence_size: sample at most this many sentences (0: all).
      num_threads: trainer threads (0: all CPU cores).

    Returns:
      The path of the written `.model` file.
    """
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top

    prefix = str(path).removesuffix(".model")
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    layout = (
        {"remove_extra_whitespaces": False, "add_dummy_prefix": False,
         "allow_whitespace_only_pieces": True}
        if keep_whitespace
        else {}
    )
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        byte_fallback=True,
        normalization_rule_name="identity",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=3,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=input_sentence_size > 0,
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=1,
        **layout,
    )
    return prefix + ".model"


def create(
    kind: str,
    *,
    texts: Iterable[str] | None = None,
    model_path: str = "",
    lower_case: bool = True,
) -> Tokenizer:
    """Creates a tokenizer.

    Args:
      kind: one of KINDS: 'char', 'byte', 'sentencepiece', 'wordpiece', 'huggingface'.
      texts: for 'char', the texts whose character set is the vocabulary.
      model_path: for 'sentencepiece', the `.model` file; for 'wordpiece', the
        `vocab.txt` file; for 'huggingface', the `tokenizer.json` file.
      lower_case: for 'wordpiece', lower-case and strip accents (uncased BERT).

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
    if kind == "wordpiece":
        if not model_path:
            raise ValueError("Tokenizer kind 'wordpiece' needs `model_path` (a vocab.txt file).")
        return WordPieceTokenizer(model_path, lower_case=lower_case)
    if kind == "huggingface":
        if not model_path:
            raise ValueError("Tokenizer kind 'huggingface' needs `model_path` (a tokenizer.json file).")
        return HuggingFaceTokenizer(model_path)
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
    if kind == "wordpiece":
        return WordPieceTokenizer(
            Path(directory) / config["vocab_file"], lower_case=config["lower_case"]
        )
    if kind == "huggingface":
        return HuggingFaceTokenizer(Path(directory) / config["tokenizer_file"], config.get("settings", {}))
    raise ValueError(
        f"{str(path)!r} names unknown tokenizer kind {kind!r}; valid kinds: {', '.join(KINDS)}."
    )


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
) -> Tokenizer:
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
    if exists(directory):
        tokenizer = load(directory)
        if tokenizer.kind != kind:
            raise ValueError(
                f"{str(directory)!r} holds a {tokenizer.kind!r} tokenizer but"
                f" {kind!r} was asked for; use another workdir or the same kind."
            )
        return tokenizer
    texts = None
    if kind == "char":
        from jaxlm.data import builders  # pylint: disable=import-outside-toplevel  (imports TFDS)

        source = builders.get_source(name, split, data_dir=data_dir, files=files, text_key=text_key)
        texts = source.iter_texts()
    tokenizer = create(kind, texts=texts, model_path=model_path)
    tokenizer.save(directory)
    return tokenizer
