"""Tests for jaxlm.data.span_corruption, jaxlm.data.text_pairs and the parallel-text builders."""

import gzip
import json
import os
import re
import types

import jax
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import tasks
from jaxlm.data import batching, builders, encoder_decoder, span_corruption, text_pairs, tokenizers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MULTI30K = builders.MULTI30K
VOCAB = 1000  # Model vocabulary of the span-corruption tests: text ids < 900, sentinels above.


def t5_counts(length: int, density: float, mean: float) -> tuple[int, int]:
    """T5's num_noise_tokens and num_noise_spans, written out from its formulas (float32)."""
    num_noise = int(np.round(np.float32(length) * np.float32(density)))
    num_noise = min(max(num_noise, 1), length - 1)
    return num_noise, max(1, int(np.round(np.float32(num_noise) / np.float32(mean))))


def spans(mask: np.ndarray) -> list[tuple[bool, int]]:
    """Runs of a mask as (value, length)."""
    edges = np.flatnonzero(np.diff(mask.astype(int))) + 1
    return [(bool(run[0]), len(run)) for run in np.split(mask, edges)]


def uncorrupt(inputs: np.ndarray, targets: np.ndarray, vocab_size: int, eos_id: int) -> list[int]:
    """The inverse of span corruption: puts each sentinel's noise span back into the inputs."""
    assert inputs[-1] == eos_id and targets[-1] == eos_id
    noise: dict[int, list[int]] = {}
    sentinel = None
    for token in targets[:-1].tolist():
        if token >= vocab_size - 100:
            sentinel = token
            noise[sentinel] = []
        else:
            noise[sentinel].append(token)
    original = []
    for token in inputs[:-1].tolist():
        original.extend(noise.pop(token) if token >= vocab_size - 100 else [token])
    assert not noise  # Every noise span went back.
    return original


def sentinels(ids: np.ndarray) -> list[int]:
    return [int(t) for t in ids if t >= VOCAB - 100]


# Noise mask and span corruption.


@pytest.mark.parametrize("density,mean", [(0.15, 3.0), (0.3, 2.0), (0.5, 8.0), (0.15, 1.0)])
def test_noise_mask_counts_follow_t5(density, mean):
    rng = np.random.default_rng(0)
    for length in [2, 3, 7, 10, 31, 100, 190, 568]:
        num_noise, num_spans = t5_counts(length, density, mean)
        mask = span_corruption.random_spans_noise_mask(length, density, mean, rng)
        runs = spans(mask)
        assert mask.shape == (length,) and mask.dtype == bool
        assert mask.sum() == num_noise
        assert [value for value, _ in runs] == [False, True] * num_spans  # Non-noise first.


def test_noise_mask_is_random_with_the_right_mean_span():
    masks = [
        span_corruption.random_spans_noise_mask(568, 0.15, 3.0, np.random.default_rng(i))
        for i in range(200)
    ]
    assert len({m.tobytes() for m in masks}) == 200
    noise_spans = [n for m in masks for value, n in spans(m) if value]
    assert np.mean(noise_spans) == pytest.approx(85 / 28)  # 85 noise tokens in 28 spans.
    assert np.mean(np.stack(masks), axis=0)[:-3].std() < 0.05  # Noise is spread over the window.
    with pytest.raises(ValueError, match="split 3 tokens into 10 non-empty spans"):
        span_corruption.random_spans_noise_mask(10, 0.3, 0.3, np.random.default_rng(0))


def test_span_corruption_layout_and_sentinel_ids(monkeypatch):
    mask = np.array([0, 0, 1, 1, 0, 0, 1], bool)
    monkeypatch.setattr(span_corruption, "random_spans_noise_mask", lambda *args: mask)
    a, b, c, d, e, f, g = range(10, 17)
    inputs, targets = span_corruption.span_corruption(
        np.array([a, b, c, d, e, f, g]), None, vocab_size=VOCAB, eos_id=1
    )
    assert inputs.tolist() == [a, b, VOCAB - 1, e, f, VOCAB - 2, 1]
    assert targets.tolist() == [VOCAB - 1, c, d, VOCAB - 2, g, 1]


def test_span_corruption_is_invertible():
    rng = np.random.default_rng(0)
    for _ in range(300):
        window = rng.integers(4, VOCAB - 100, size=int(rng.integers(2, 300)))
        inputs, targets = span_corruption.span_corruption(window, rng, vocab_size=VOCAB, eos_id=1)
        assert uncorrupt(inputs, targets, VOCAB, eos_id=1) == window.tolist()
        num_spans = t5_counts(len(window), 0.15, 3.0)[1]
        expected = [VOCAB - 1 - k for k in range(num_spans)]
        assert sentinels(inputs) == sentinels(targets) == expected
        assert targets[0] == VOCAB - 1


def test_lengths_fill_the_inputs_exactly():
    assert span_corruption.span_corruption_lengths(512) == (568, 114)  # T5's numbers.
    rng = np.random.default_rng(0)
    for inputs_length in [8, 16, 64, 100, 128, 172, 256, 512, 1024]:
        tokens_length, targets_length = span_corruption.span_corruption_lengths(inputs_length)
        for _ in range(5):
            window = rng.integers(4, 800, size=tokens_length)
            inputs, targets = span_corruption.span_corruption(window, rng, vocab_size=VOCAB, eos_id=1)
            assert (len(inputs), len(targets)) == (inputs_length, targets_length)


# Span-corruption batches.


def span_dataset(**kwargs):
    defaults = {"inputs_length": 32, "global_batch_size": 4, "seed": 0, "vocab_size": VOCAB}
    tokens = 10 + np.arange(kwargs.pop("num_tokens", 8 * 35), dtype=np.int32)
    return span_corruption.span_corruption_dataset(tokens, eos_id=1, **{**defaults, **kwargs})


def check_batch_features(batch, rows, *, eos_id=1, decoder_start_id=0, pad_id=0):
    assert sorted(batch) == sorted(encoder_decoder.FEATURES)
    assert batch["example_weight"].shape == (rows,)
    assert batch["example_weight"].dtype == batch["decoder_loss_weights"].dtype == np.float32
    for key in ("encoder_input_tokens", "decoder_target_tokens", "decoder_input_tokens"):
        assert batch[key].dtype == np.int32 and batch[key].shape[0] == rows
    targets, weights = batch["decoder_target_tokens"], batch["decoder_loss_weights"]
    np.testing.assert_array_equal(batch["decoder_input_tokens"][:, 0], decoder_start_id)
    np.testing.assert_array_equal(batch["decoder_input_tokens"][:, 1:], targets[:, :-1])
    for row in range(rows):
        length = int(weights[row].sum())  # The real target tokens, EOS last.
        np.testing.assert_array_equal(weights[row], np.arange(targets.shape[1]) < length)
        assert targets[row, length - 1] == eos_id and eos_id not in targets[row, : length - 1]
        np.testing.assert_array_equal(targets[row, length:], pad_id)


def test_span_batches_have_t5_features():
    ds = span_dataset(decoder_start_id=3)
    batch = ds[0]
    tokens_length, targets_length = span_corruption.span_corruption_lengths(32)
    assert batch["encoder_input_tokens"].shape == (4, 32)
    assert batch["decoder_target_tokens"].shape == (4, targets_length)
    check_batch_features(batch, 4, decoder_start_id=3)
    np.testing.assert_array_equal(batch["example_weight"], 1.0)
    np.testing.assert_array_equal(batch["encoder_input_tokens"][:, -1], 1)  # No padding: EOS last.
    for inputs, targets in zip(batch["encoder_input_tokens"], batch["decoder_target_tokens"]):
        original = uncorrupt(inputs, targets, VOCAB, eos_id=1)
        assert original == list(range(original[0], original[0] + tokens_length))


def test_span_noise_is_redrawn_every_epoch():
    tokens_length = span_corruption.span_corruption_lengths(32)[0]
    ds = span_dataset()  # 8 windows, 2 batches per epoch.
    epochs = []
    for epoch in range(2):
        batches = [ds[2 * epoch + j] for j in range(2)]
        inputs = np.concatenate([b["encoder_input_tokens"] for b in batches])
        windows = (inputs[:, 0] - 10) // tokens_length  # The first token is never noise.
        assert sorted(windows) == list(range(8))
        epochs.append(dict(zip(windows.tolist(), inputs.tolist())))
    assert sum(epochs[0][w] != epochs[1][w] for w in range(8)) >= 6
    again = span_dataset()[0]["encoder_input_tokens"]
    np.testing.assert_array_equal(again, ds[0]["encoder_input_tokens"])  # Deterministic.


def test_span_processes_see_slices_of_the_same_global_batches():
    single = span_dataset(global_batch_size=4)
    halves = [span_dataset(global_batch_size=4, process_index=p, process_count=2) for p in range(2)]
    for j in range(5):  # Crosses the epoch boundary (2 batches per epoch).
        for key in encoder_decoder.FEATURES:
            rows = np.concatenate([ds[j][key] for ds in halves])
            np.testing.assert_array_equal(rows, single[j][key])


def test_span_eval_batches_are_fixed_and_split_by_process():
    tokens = 10 + np.arange(40 * 35, dtype=np.int32)
    kwargs = {"inputs_length": 32, "global_batch_size": 4, "seed": 5, "vocab_size": 2000}
    batches = span_corruption.span_corruption_eval_batches(tokens, eos_id=1, **kwargs)
    tokens_length = span_corruption.span_corruption_lengths(32)[0]
    assert len(batches) == (len(tokens) // tokens_length) // 4
    windows = batches[1]["encoder_input_tokens"][:, 0] - 10
    np.testing.assert_array_equal(windows, np.arange(4, 8) * tokens_length)  # In order.
    halves = [
        span_corruption.span_corruption_eval_batches(
            tokens, eos_id=1, max_batches=2, process_index=p, process_count=2, **kwargs
        )
        for p in range(2)
    ]
    assert len(halves[0]) == 2
    for j in range(2):
        rows = np.concatenate([h[j]["decoder_target_tokens"] for h in halves])
        np.testing.assert_array_equal(rows, batches[j]["decoder_target_tokens"])


def test_span_tokens_colliding_with_sentinels_say_so():
    with pytest.raises(ValueError, match=r"Token id 999 collides with the \d+ sentinels"):
        span_dataset(num_tokens=990)



def test_span_eval_split_smaller_than_one_batch_names_the_split(tmp_path):
    """The task's eval batches over 1 window with batch_size 8 (no padded batch: span corruption
    drops a partial one): an error naming the split, its size and the batch size."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("We are accounted poor citizens.\n")  # validation: file 0
    train = [f"Speech {i}: {i * 37 % 1000} citizens, {i * 91 % 1000} senators of Rome."
             for i in range(300)]
    (corpus / "b.txt").write_text("\n".join(train))
    config = config_lib.from_file(os.path.join(REPO, "configs", "t5_span_corruption.py"))
    sentencepiece = tokenizers.train_sentencepiece(train, vocab_size=320, path=tmp_path / "sp")
    config.data.update({"name": builders.TEXT_FILES, "files": str(corpus / "*.txt"), "seq_len": 16,
                        "data_dir": str(tmp_path / "tfds"), "tokenizer_path": sentencepiece})
    config.train.batch_size = 8
    cls = tasks.get(config.task.name)
    task = cls(config, cls.build_tokenizer(config, str(tmp_path / "workdir")))
    assert next(task.train_iterator())["encoder_input_tokens"].shape == (8, 16)
    with pytest.raises(ValueError, match=re.escape("Split 'validation' of jaxlm_text_files (")
                       + r"\d+ tokens\) has 1 windows of \d+ tokens \(for inputs_length 16\), "
                       + re.escape("fewer than one global batch of 8")):
        task.eval_batches("validation", 0)

# Parallel text: builders.


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def multi30k(data_dir):
    directory = builders.jaxlm_data_dir() / "multi30k"
    if not (directory / "val.de.gz").is_file():
        pytest.skip(f"{directory} is missing")
    return {
        split: builders.get_pairs(
            MULTI30K, split, source_key="en", target_key="de", data_dir=data_dir
        )
        for split in ("train", "validation")
    }


def raw_lines(name: str) -> list[str]:
    path = builders.jaxlm_data_dir() / "multi30k" / name
    return gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")[:-1]


def test_multi30k_pairs_match_the_raw_files(multi30k, data_dir):
    train, validation = multi30k["train"], multi30k["validation"]
    assert (len(train), len(validation)) == (29_000, 1_014)
    en, de = raw_lines("train.en.gz"), raw_lines("train.de.gz")
    assert train[0] == (en[0], de[0])
    assert train[0][0] == "Two young, White males are outside near many bushes."
    assert train[-1] == (en[-1], de[-1])
    assert list(validation.iter_pairs()) == list(
        zip(raw_lines("val.en.gz"), raw_lines("val.de.gz"))
    )
    german = builders.get_source(MULTI30K, "validation", data_dir=data_dir, text_key="de")
    assert german[3] == validation[3][1]
    with pytest.raises(ValueError, match="features de, en, not 'fr'; set target_key"):
        builders.get_pairs(MULTI30K, "train", source_key="en", target_key="fr", data_dir=data_dir)


def test_parallel_text_reads_aligned_lines(tmp_path):
    (tmp_path / "src.txt.gz").write_bytes(gzip.compress("eins\r\nzwei\n\ndrei ✓\n".encode()))
    (tmp_path / "tgt.txt").write_text("one\ntwo\n\nthree ✓", encoding="utf-8")
    files = f"{tmp_path}/src.txt.gz,{tmp_path}/tgt.txt"
    pairs = builders.get_pairs(
        builders.PARALLEL_TEXT,
        "train",
        source_key="source",
        target_key="target",
        data_dir=str(tmp_path / "tfds"),
        files=files,
    )
    assert list(pairs.iter_pairs()) == [
        ("eins", "one"),
        ("zwei", "two"),
        ("", ""),
        ("drei ✓", "three ✓"),
    ]


def test_parallel_text_line_counts_must_match(tmp_path):
    (tmp_path / "src.txt").write_text("a\nb\nc\n")
    (tmp_path / "tgt.txt").write_text("A\nB\n")
    with pytest.raises(ValueError, match=r"src\.txt' has 3 lines but .*tgt\.txt' has 2"):
        builders.get_pairs(
            builders.PARALLEL_TEXT,
            "train",
            source_key="source",
            target_key="target",
            data_dir=str(tmp_path / "tfds"),
            files=f"{tmp_path}/src.txt,{tmp_path}/tgt.txt",
        )
    with pytest.raises(ValueError, match="two files"):
        builders.get_builder(builders.PARALLEL_TEXT, files=str(tmp_path / "src.txt"))
    with pytest.raises(ValueError, match="jaxlm_multi30k, jaxlm_parallel_text"):
        builders.get_builder("jaxlm_nothing")


# Parallel text: batches.

PAIRS = [(f"source {i} " + "x" * (i % 7), f"target {i}" + "y" * (i % 5)) for i in range(50)]


def pair_kwargs(**kwargs):
    return {
        "tokenizer": tokenizers.create("byte"),
        "source_len": 24,
        "target_len": 16,
        "global_batch_size": 8,
        "eos_id": 256,
        **kwargs,
    }


def decode_rows(batch, key="decoder_target_tokens"):
    byte = tokenizers.create("byte")
    return [byte.decode(row[row != 0]) for row in batch[key]]


def test_pair_batches_truncate_and_shift():
    batch = text_pairs.pairs_dataset(PAIRS, seed=0, decoder_start_id=5, **pair_kwargs())[0]
    check_batch_features(batch, 8, eos_id=256, decoder_start_id=5)
    for source, target in zip(decode_rows(batch, "encoder_input_tokens"), decode_rows(batch)):
        i = int(source.split()[1])
        assert source == PAIRS[i][0][:23] and target == PAIRS[i][1][:15]
    long = text_pairs.pairs_eval_batches(
        pairs=[("s" * 40, "t" * 3)], **pair_kwargs(global_batch_size=1)
    )
    np.testing.assert_array_equal(long[0]["encoder_input_tokens"][0], [ord("s")] * 23 + [256])
    np.testing.assert_array_equal(long[0]["decoder_loss_weights"][0], [1] * 4 + [0] * 12)


def test_pair_epochs_shuffle_and_processes_split_global_batches():
    single = text_pairs.pairs_dataset(PAIRS, seed=1, **pair_kwargs())
    halves = [
        text_pairs.pairs_dataset(PAIRS, seed=1, process_index=p, process_count=2, **pair_kwargs())
        for p in range(2)
    ]
    seen = []
    for j in range(25):  # 4 epochs of 50 pairs.
        for key in encoder_decoder.FEATURES:
            rows = np.concatenate([ds[j][key] for ds in halves])
            np.testing.assert_array_equal(rows, single[j][key])
        seen += [int(s.split()[1]) for s in decode_rows(single[j], "encoder_input_tokens")]
    epochs = [seen[e * 50 : (e + 1) * 50] for e in range(4)]
    assert all(sorted(e) == list(range(50)) for e in epochs)
    assert epochs[0] != list(range(50)) and epochs[0] != epochs[1]


def test_pair_iterator_state_restores_the_next_batches():
    kwargs = pair_kwargs(pairs=PAIRS, seed=3, process_index=1, process_count=2)
    it = text_pairs.pairs_train_iterator(**kwargs)
    for _ in range(9):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(4)]
    resumed = text_pairs.pairs_train_iterator(**kwargs)
    resumed.set_state(state)
    for a, b in zip(expected, [next(resumed) for _ in range(4)]):
        np.testing.assert_array_equal(a["encoder_input_tokens"], b["encoder_input_tokens"])


BUCKET_PAIRS = [(f"s{i} " + "x" * (i * 7 % 20), f"t{i} " + "y" * (i * 3 % 13)) for i in range(96)]


def pair_lengths(batch) -> np.ndarray:
    return np.maximum((batch["encoder_input_tokens"] > 0).sum(-1), (batch["decoder_loss_weights"] > 0).sum(-1))


def test_bucketed_batches_hold_similar_lengths_and_every_pair_once_per_window():
    kwargs = pair_kwargs(pairs=BUCKET_PAIRS, seed=2)
    plain = text_pairs.pairs_dataset(bucket_batches=0, **kwargs)
    bucketed = text_pairs.pairs_dataset(bucket_batches=6, **kwargs)  # windows of 48 pairs
    ids = lambda batch: sorted(int(s.split()[0][1:]) for s in decode_rows(batch, "encoder_input_tokens"))
    for window in range(4):  # the same pairs as the plain stream's, window by window
        batches = range(window * 6, (window + 1) * 6)
        assert sorted(sum((ids(bucketed[j]) for j in batches), [])) == sorted(sum((ids(plain[j]) for j in batches), []))
    spread = lambda ds: np.mean([np.ptp(pair_lengths(ds[j])) for j in range(24)])
    assert spread(bucketed) < 0.3 * spread(plain), (spread(bucketed), spread(plain))
    halves = [text_pairs.pairs_dataset(bucket_batches=6, process_index=p, process_count=2, **kwargs)
              for p in range(2)]
    for j in range(12):
        np.testing.assert_array_equal(np.concatenate([h[j]["encoder_input_tokens"] for h in halves]),
                                      bucketed[j]["encoder_input_tokens"])
    with pytest.raises(ValueError, match="bucketing window"):
        batching.length_bucketed_epochs([1, 2, 3], 0, lambda epoch, i: i, window=10, batch_size=4)


def test_fit_length_keeps_the_loss_of_every_pair():
    """A batch cut to its longest row (rounded up) has the same loss per pair as at full length."""
    config = config_lib.from_file(os.path.join(REPO, "configs/t5_multi30k.py"))
    config.model.update(dict(emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64, num_layers=1, num_decoder_layers=1))
    config.data.update(dict(pad_multiple=4, seq_len=24, target_len=16))
    byte_with_pad = types.SimpleNamespace(pad_id=0, eos_id=256, vocab_size=257)  # pair_kwargs' ids
    task = tasks.get(config.task.name)(config, byte_with_pad)
    params = task.init(jax.random.key(0))["params"]
    dataset = text_pairs.pairs_dataset(BUCKET_PAIRS, seed=0, bucket_batches=12, **pair_kwargs())
    batch = min((dataset[j] for j in range(12)), key=lambda b: pair_lengths(b).max())  # the shortest
    cut = task.fit_length(batch)
    length = -(-int(pair_lengths(batch).max()) // 4) * 4
    assert cut["encoder_input_tokens"].shape[-1] == length < 24
    assert cut["decoder_target_tokens"].shape[-1] == min(length, 16)
    for i in range(len(batch["example_weight"])):
        row = lambda b: {k: v[i:i + 1] for k, v in b.items()}
        full, _ = task.loss(params, row(batch))
        short, _ = task.loss(params, row(cut))
        np.testing.assert_allclose(short, full, rtol=1e-5)


def test_encodings_are_cached_per_pairs_tokenizer_and_prefix(multi30k, data_dir):
    byte = tokenizers.create("byte")
    first = text_pairs.encode_pairs(multi30k["validation"], byte)
    again = builders.get_pairs(
        MULTI30K, "validation", source_key="en", target_key="de", data_dir=data_dir
    )
    assert text_pairs.encode_pairs(again, byte) is first  # Same data: not encoded again.
    prefixed = text_pairs.encode_pairs(again, byte, source_prefix="en: ")
    assert byte.decode(prefixed[0][0]) == "en: " + again[0][0]
    assert byte.decode(first[0][1]) == again[0][1]


def test_eval_batches_cover_every_multi30k_pair_once(multi30k):
    validation = multi30k["validation"]
    kwargs = pair_kwargs(pairs=validation, source_len=160, target_len=200, global_batch_size=64)
    halves = [
        text_pairs.pairs_eval_batches(process_index=p, process_count=2, **kwargs) for p in range(2)
    ]
    assert len(halves[0]) == len(halves[1]) == 16  # 1,014 = 15 * 64 + 54.
    expected = list(validation.iter_pairs())
    for j in range(16):
        batch = {k: np.concatenate([h[j][k] for h in halves]) for k in encoder_decoder.FEATURES}
        real = int(batch["example_weight"].sum())
        assert real == (64 if j < 15 else 54)
        np.testing.assert_array_equal(batch["example_weight"], np.arange(64) < real)
        sources = decode_rows(batch, "encoder_input_tokens")
        for r in range(real):
            assert (sources[r], decode_rows(batch)[r]) == expected[j * 64 + r]
        for key in ("encoder_input_tokens", "decoder_input_tokens", "decoder_loss_weights"):
            assert not batch[key][real:].any()  # Padding rows.
    assert len(text_pairs.pairs_eval_batches(max_batches=3, **kwargs)) == 3


def test_train_sentencepiece_on_multi30k(multi30k, tmp_path):
    texts = [text for pair in multi30k["train"].__getitems__(range(2000)) for text in pair]
    path = tokenizers.train_sentencepiece(
        texts, vocab_size=600, path=tmp_path / "joint", num_threads=1
    )
    assert path == f"{tmp_path}/joint.model"
    tokenizer = tokenizers.create("sentencepiece", model_path=path)
    assert tokenizer.vocab_size == 600
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id) == (0, 1, 3)
    for source, target in multi30k["validation"].__getitems__(range(20)):
        for text in (source, target):
            ids = tokenizer.encode(text)
            assert len(ids) < len(text.encode()) and tokenizer.decode(ids) == text
