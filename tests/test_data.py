"""Tests for jaxlm.data.builders and jaxlm.data.lm."""

import json
import re
from pathlib import Path

import grain
import numpy as np
import pytest

from jaxlm.data import builders
from jaxlm.data import lm
from jaxlm.data import tokenizers

SHAKESPEARE = builders.TINY_SHAKESPEARE
TEXT_FILES = builders.TEXT_FILES


@pytest.fixture(scope="module")
def shakespeare_text() -> str:
    path = builders.jaxlm_data_dir() / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    """One prepared-data directory for the module: Tiny Shakespeare is prepared once."""
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def char_tokenizer(shakespeare_text) -> tokenizers.Tokenizer:
    return tokenizers.create("char", texts=[shakespeare_text])


def write_corpus(directory: Path, num_files: int = 12) -> list[Path]:
    """Small documents of distinct text; one is not valid UTF-8."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "épsilon", "🙂", "zeta\n"]
    paths = []
    for i in range(num_files):
        path = directory / f"doc_{i:02d}.txt"
        path.write_text(
            f"document {i}: " + " ".join(rng.choice(words, 200 + 10 * i)), encoding="utf-8"
        )
        paths.append(path)
    if num_files > 3:
        paths[3].write_bytes(b"latin-1 caf\xe9 bytes\n")
    return sorted(paths)


def read_expected(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


# Builders.


def test_shakespeare_splits_equal_nanogpt_split(shakespeare_text, data_dir):
    n = len(shakespeare_text)
    train = builders.get_source(SHAKESPEARE, "train", data_dir=data_dir)
    validation = builders.get_source(SHAKESPEARE, "validation", data_dir=data_dir)
    assert "".join(train[i] for i in range(len(train))) == shakespeare_text[: int(n * 0.9)]
    assert "".join(validation.iter_texts()) == shakespeare_text[int(n * 0.9) :]
    assert len(train) > 1 and train.one_document  # Stored in ordered chunks.
    assert train.__getitems__([2, 0]) == [train[2], train[0]]
    assert (Path(data_dir) / SHAKESPEARE / "1.0.0").is_dir()


def test_shakespeare_prepares_once(shakespeare_text, data_dir):
    builders.get_source(SHAKESPEARE, "train", data_dir=data_dir)
    prepared = sorted(p.name for p in (Path(data_dir) / SHAKESPEARE / "1.0.0").iterdir())
    mtimes = [
        p.stat().st_mtime_ns for p in sorted((Path(data_dir) / SHAKESPEARE / "1.0.0").iterdir())
    ]
    builders.get_source(SHAKESPEARE, "validation", data_dir=data_dir)
    assert sorted(p.name for p in (Path(data_dir) / SHAKESPEARE / "1.0.0").iterdir()) == prepared
    assert [
        p.stat().st_mtime_ns for p in sorted((Path(data_dir) / SHAKESPEARE / "1.0.0").iterdir())
    ] == mtimes


def test_shakespeare_missing_input_names_path(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLM_DATA_DIR", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=r"empty/tinyshakespeare/input\.txt"):
        builders.get_source(SHAKESPEARE, "train", data_dir=str(tmp_path / "tfds"))


def test_unknown_split_lists_available(shakespeare_text, data_dir):
    with pytest.raises(ValueError, match=r"'test'.*train, validation"):
        builders.get_source(SHAKESPEARE, "test", data_dir=data_dir)


def test_text_files_round_trip_and_validation_split(tmp_path):
    paths = write_corpus(tmp_path / "corpus")
    files = str(tmp_path / "corpus" / "*.txt")
    data_dir = str(tmp_path / "tfds")
    train = builders.get_source(TEXT_FILES, "train", data_dir=data_dir, files=files)
    validation = builders.get_source(TEXT_FILES, "validation", data_dir=data_dir, files=files)
    # Every 10th file of the sorted list (0 and 10) is validation; order is kept.
    assert list(validation.iter_texts()) == [read_expected(paths[0]), read_expected(paths[10])]
    assert list(train.iter_texts()) == [read_expected(p) for i, p in enumerate(paths) if i % 10]
    assert not train.one_document
    assert "caf\ufffd" in train[2]  # doc_03: invalid UTF-8 replaced.
    again = builders.get_source(TEXT_FILES, "validation", data_dir=data_dir, files=files)
    assert list(again.iter_texts()) == list(validation.iter_texts())


def test_text_files_globs_do_not_collide(tmp_path):
    write_corpus(tmp_path / "a", num_files=4)
    write_corpus(tmp_path / "b", num_files=6)
    data_dir = str(tmp_path / "tfds")
    a = builders.get_source(TEXT_FILES, "train", data_dir=data_dir, files=str(tmp_path / "a" / "*"))
    b = builders.get_source(TEXT_FILES, "train", data_dir=data_dir, files=str(tmp_path / "b" / "*"))
    both = builders.get_source(
        TEXT_FILES, "train", data_dir=data_dir, files=f"{tmp_path}/a/*,{tmp_path}/b/*"
    )
    assert (len(a), len(b), len(both)) == (3, 5, 9)
    configs = sorted(p.name for p in (Path(data_dir) / TEXT_FILES).iterdir())
    assert len(configs) == 3
    assert (
        len(
            builders.get_source(
                TEXT_FILES, "train", data_dir=data_dir, files=str(tmp_path / "a" / "*")
            )
        )
        == 3
    )


def test_text_files_single_file_splits_characters(tmp_path):
    text = "".join(f"line {i} ✓\n" for i in range(3000))
    (tmp_path / "one.txt").write_text(text, encoding="utf-8")
    kwargs = dict(data_dir=str(tmp_path / "tfds"), files=str(tmp_path / "one.txt"))
    train = builders.get_source(TEXT_FILES, "train", **kwargs)
    validation = builders.get_source(TEXT_FILES, "validation", **kwargs)
    assert train.one_document and validation.one_document
    n = len(text)
    assert "".join(train.iter_texts()) == text[: int(n * 0.9)]
    assert "".join(validation.iter_texts()) == text[int(n * 0.9) :]


def test_text_files_empty_glob_names_it(tmp_path):
    pattern = str(tmp_path / "nothing" / "*.py")
    with pytest.raises(FileNotFoundError, match=r"nothing/\*\.py"):
        builders.get_source(TEXT_FILES, "train", data_dir=str(tmp_path), files=pattern)
    write_corpus(tmp_path / "a", num_files=2)  # one glob of two matching nothing: named too
    with pytest.raises(FileNotFoundError, match=r"No files match the glob '.*nothing/\*\.py'"):
        builders.get_source(TEXT_FILES, "train", data_dir=str(tmp_path / "tfds"),
                            files=f"{tmp_path}/a/*,{pattern}")


def test_text_files_without_examples_name_the_split_and_file(tmp_path):
    empty, one = tmp_path / "empty.txt", tmp_path / "one.txt"
    empty.write_text("")
    one.write_text("x")  # 90% of one character is none: the train split gets nothing
    data_dir = str(tmp_path / "tfds")
    with pytest.raises(ValueError, match=re.escape(
            f"jaxlm_text_files: split 'train' has no examples: '{empty}' is empty.")):
        builders.get_source(TEXT_FILES, "validation", data_dir=data_dir, files=str(empty))
    with pytest.raises(ValueError, match=re.escape(
            f"jaxlm_text_files: split 'train' has no examples: '{one}' holds none.")):
        builders.get_source(TEXT_FILES, "train", data_dir=data_dir, files=str(one))


# Pipeline.


def test_shakespeare_stream_equals_nanogpt_encoding(shakespeare_text, data_dir, char_tokenizer):
    n = len(shakespeare_text)
    stoi = {c: i for i, c in enumerate(sorted(list(set(shakespeare_text))))}
    val_ids = np.array([stoi[c] for c in shakespeare_text[int(n * 0.9) :]])
    stream = lm.token_stream(
        name=SHAKESPEARE, split="validation", tokenizer=char_tokenizer, data_dir=data_dir
    )
    np.testing.assert_array_equal(stream, val_ids)
    windows = lm.pack(stream, 256)
    assert windows.shape == (len(val_ids) // 257, 257)
    np.testing.assert_array_equal(windows[3], val_ids[3 * 257 : 4 * 257])


def test_train_batches_shift_and_determinism(shakespeare_text, data_dir, char_tokenizer):
    def take(seed, n=3):
        it = lm.train_iterator(
            name=SHAKESPEARE,
            split="train",
            tokenizer=char_tokenizer,
            seq_len=32,
            global_batch_size=4,
            seed=seed,
            data_dir=data_dir,
        )
        return [next(it) for _ in range(n)]

    batches = take(seed=1)
    for batch in batches:
        assert batch["inputs"].shape == batch["targets"].shape == (4, 32)
        assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
        np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
        text = char_tokenizer.decode(np.concatenate([batch["inputs"][0], batch["targets"][0, -1:]]))
        assert text in shakespeare_text  # A contiguous window of the text.
    for a, b in zip(batches, take(seed=1)):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
    assert not np.array_equal(batches[0]["inputs"], take(seed=2)[0]["inputs"])


def window_ids(batch) -> list[int]:
    """Window numbers of a batch built from `numbered_tokens`."""
    return list(batch["inputs"][:, 0] // 10)


def numbered_tokens(n: int) -> np.ndarray:
    """A stream whose window i (10 tokens, seq_len 9) starts at token 10 * i (+ the epoch offset)."""
    return np.arange(n * 10 + 9, dtype=np.int32)


def dataset(n: int, **kwargs) -> grain.MapDataset:
    return lm.train_dataset(numbered_tokens(n), seq_len=9, **kwargs)


def test_each_epoch_is_a_new_permutation_with_new_window_boundaries():
    n, batch_size = 24, 4
    ds = dataset(n, global_batch_size=batch_size, seed=0)
    batches = [ds[j]["inputs"] for j in range(3 * n // batch_size)]
    order = [i for batch in batches for i in window_ids({"inputs": batch})]
    epochs = [order[:n], order[n : 2 * n], order[2 * n :]]
    for epoch in epochs:
        assert sorted(epoch) == list(range(n))
    assert epochs[0] != list(range(n))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    offsets = [
        {int(x) for x in np.concatenate(batches[e * 6 : (e + 1) * 6])[:, 0] % 10} for e in range(3)
    ]
    assert offsets[0] == {0} and len(offsets[1]) == len(offsets[2]) == 1  # one offset per epoch
    assert offsets[1] != {0} or offsets[2] != {0}


@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_see_slices_of_the_same_global_batches(process_count):
    single = dataset(50, global_batch_size=8, seed=3)
    per_process = [
        dataset(50, global_batch_size=8, seed=3, process_index=p, process_count=process_count)
        for p in range(process_count)
    ]
    for j in range(20):  # Crosses epoch boundaries (50 windows, 8 per batch).
        rows = np.concatenate([ds[j]["inputs"] for ds in per_process])
        np.testing.assert_array_equal(rows, single[j]["inputs"])


def test_global_batch_not_divisible_names_both_numbers():
    with pytest.raises(ValueError, match=r"global_batch_size 10.*process_count 4"):
        dataset(50, global_batch_size=10, seed=0, process_index=0, process_count=4)


def test_iterator_state_restores_the_next_batches(shakespeare_text, data_dir, char_tokenizer):
    kwargs = dict(
        name=SHAKESPEARE,
        split="train",
        tokenizer=char_tokenizer,
        seq_len=16,
        global_batch_size=4,
        seed=7,
        data_dir=data_dir,
        process_index=1,
        process_count=2,
    )
    it = lm.train_iterator(**kwargs)
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # As the trainer's checkpoint stores it.
    expected = [next(it) for _ in range(5)]
    resumed = lm.train_iterator(**kwargs)
    resumed.set_state(state)
    for a, b in zip(expected, [next(resumed) for _ in range(5)]):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
        np.testing.assert_array_equal(a["targets"], b["targets"])


def test_seq_len_too_large_says_so(shakespeare_text, data_dir, char_tokenizer):
    with pytest.raises(ValueError, match=r"434 windows of seq_len \+ 1 = 257.*global batch of 512"):
        lm.train_iterator(
            name=SHAKESPEARE,
            split="validation",
            tokenizer=char_tokenizer,
            seq_len=256,
            global_batch_size=512,
            seed=0,
            data_dir=data_dir,
        )


def test_eval_batches_in_order_and_split_by_process(shakespeare_text, data_dir, char_tokenizer):
    kwargs = dict(
        name=SHAKESPEARE,
        split="validation",
        tokenizer=char_tokenizer,
        seq_len=256,
        data_dir=data_dir,
    )
    stream = lm.token_stream(
        name=SHAKESPEARE, split="validation", tokenizer=char_tokenizer, data_dir=data_dir
    )
    all_batches = lm.eval_batches(global_batch_size=8, **kwargs)
    assert len(all_batches) == (len(stream) // 257) // 8 == 54  # Remainder dropped.
    np.testing.assert_array_equal(all_batches[0]["inputs"][0], stream[:256])
    np.testing.assert_array_equal(all_batches[1]["targets"][0], stream[8 * 257 + 1 : 9 * 257])
    first = lm.eval_batches(global_batch_size=8, max_batches=3, **kwargs)
    assert len(first) == 3
    halves = [
        lm.eval_batches(
            global_batch_size=8, max_batches=3, process_index=p, process_count=2, **kwargs
        )
        for p in range(2)
    ]
    for j in range(3):
        np.testing.assert_array_equal(first[j]["inputs"], all_batches[j]["inputs"])
        rows = np.concatenate([halves[0][j]["inputs"], halves[1][j]["inputs"]])
        np.testing.assert_array_equal(rows, first[j]["inputs"])


def test_documents_joined_with_eos(tmp_path):
    paths = write_corpus(tmp_path / "corpus", num_files=3)
    byte = tokenizers.create("byte")
    stream = lm.token_stream(
        name=TEXT_FILES,
        split="train",
        tokenizer=byte,
        data_dir=str(tmp_path / "tfds"),
        files=str(tmp_path / "corpus/*"),
    )
    train_docs = [read_expected(p).encode("utf-8") for p in paths[1:]]  # File 0 is validation.
    expected = list(train_docs[0]) + [256] + list(train_docs[1])
    np.testing.assert_array_equal(stream, expected)


def test_build_tokenizer_saves_then_loads(shakespeare_text, data_dir, tmp_path):
    workdir = tmp_path / "run"
    tokenizer = tokenizers.build_tokenizer(
        "char", workdir=workdir, name=SHAKESPEARE, data_dir=data_dir
    )
    assert tokenizer.vocab_size == 65
    assert (workdir / "tokenizer" / "tokenizer.json").is_file()
    loaded = tokenizers.build_tokenizer("char", workdir=workdir, name="unused-when-saved")
    assert loaded.fingerprint == tokenizer.fingerprint
    with pytest.raises(ValueError, match="holds a 'char' tokenizer"):
        tokenizers.build_tokenizer("byte", workdir=workdir, name=SHAKESPEARE)
