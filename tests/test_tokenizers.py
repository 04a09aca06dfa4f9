"""Tests for jaxlm.data.tokenizers and tools/train_tokenizer.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxlm.data import builders
from jaxlm.data import tokenizers

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
    chars = sorted(list(set(shakespeare)))
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
    with pytest.raises(ValueError, match=r"'wordpiece'.*char, byte, sentencepiece"):
        tokenizers.create("wordpiece")


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
