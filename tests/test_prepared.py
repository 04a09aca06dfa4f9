"""Prepared corpora (tools/prepare_data.py, jaxlm/data/prepared.py): ArrayRecord shards hold
exactly the in-memory path's windows, read back with random access, per process, resumable, with
memory that does not grow with the corpus; a run trains on them and refuses another tokenizer's."""

import glob
import json
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm.data import batching, builders, lm, prepared, tokenizers
from jaxlm.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "the of and to in a is that for it as was with be by on not he this are or his from at which".split()


def write_corpus(directory, files: int, words_per_file: int, seed: int = 0) -> str:
    """`files` text files of random words; returns their glob."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    for i in range(files):
        words = rng.choice(WORDS, words_per_file)
        with open(os.path.join(directory, f"doc{i:04d}.txt"), "w") as f:
            f.write(" ".join(words) + "\n")
    return os.path.join(directory, "*.txt")


def byte_tokenizer(directory) -> str:
    path = os.path.join(directory, "tokenizer")
    tokenizers.create("byte").save(path)
    return path


def prepare(tmp_path, files: str, split="train", seq_len=16, unit_bytes=5000, **kwargs):
    out = tmp_path / "corpus"
    units = prepared.source_units(name="jaxlm_text_files", split=split, files=files, unit_bytes=unit_bytes)
    prepared.prepare(out, split, units, tokenizer_dir=byte_tokenizer(out), seq_len=seq_len, **kwargs)
    return prepared.Corpus(out, split)


def test_shards_hold_exactly_the_windows_of_the_in_memory_path(tmp_path, data_dir):
    files = write_corpus(tmp_path / "text", files=23, words_per_file=300)
    corpus = prepare(tmp_path, files, seq_len=16, workers=2, shard_bytes=3000)  # 88 windows per shard
    assert 1 < corpus.manifest["units"] < 20  # several files per unit, several units
    stream = lm.token_stream(name="jaxlm_text_files", split="train", tokenizer=tokenizers.create("byte"),
                             files=files, data_dir=data_dir)
    expected = lm.pack(stream, 16)
    assert len(corpus.manifest["shards"]) > 3 and len(corpus) == len(expected) > 300
    np.testing.assert_array_equal(corpus.windows(range(len(corpus))), expected)
    assert corpus.manifest["tokens"] == len(stream) and corpus.manifest["documents"] == 20  # 3 files: validation
    np.testing.assert_array_equal(corpus[7], expected[7])


def test_an_existing_split_is_never_overwritten_and_a_failed_one_leaves_nothing(tmp_path):
    files = write_corpus(tmp_path / "text", files=4, words_per_file=100)
    corpus = prepare(tmp_path, files)
    before = corpus.windows(range(len(corpus)))
    with pytest.raises(FileExistsError, match="never overwritten"):
        prepare(tmp_path, files)
    np.testing.assert_array_equal(prepared.Corpus(tmp_path / "corpus", "train").windows(range(len(corpus))), before)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: needs a string field 'text'"):
        prepared.prepare(tmp_path / "corpus", "validation", prepared.jsonl_units(str(bad)),
                         tokenizer_dir=tmp_path / "corpus" / "tokenizer", seq_len=4, workers=1)
    assert not (tmp_path / "corpus" / "validation").exists()
    with pytest.raises(FileNotFoundError, match="No prepared split 'validation'.*'train'"):
        prepared.Corpus(tmp_path / "corpus", "validation")


def test_jsonl_documents_are_joined_as_the_in_memory_path_joins_documents(tmp_path):
    lines = [{"text": "first document"}, {"text": "a second, longer document"}, {"text": "third"}]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "corpus"
    prepared.prepare(out, "train", prepared.jsonl_units(str(path)), tokenizer_dir=byte_tokenizer(out), seq_len=5,
                     workers=1)
    tok = tokenizers.create("byte")
    stream = np.concatenate([tok.encode(lines[0]["text"]), [tok.eos_id], tok.encode(lines[1]["text"]),
                             [tok.eos_id], tok.encode(lines[2]["text"])])
    corpus = prepared.Corpus(out, "train")
    np.testing.assert_array_equal(corpus.windows(range(len(corpus))), lm.pack(stream, 5))


def test_a_resumed_iterator_continues_at_the_same_window_and_processes_read_disjoint_rows(tmp_path):
    files = write_corpus(tmp_path / "text", files=6, words_per_file=400)
    corpus = prepare(tmp_path, files)
    it = batching.iterate(prepared.train_dataset(corpus, global_batch_size=8, seed=3))
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    resumed = batching.iterate(prepared.train_dataset(corpus, global_batch_size=8, seed=3))
    resumed.set_state(json.loads(json.dumps(state)))
    for want in expected:
        np.testing.assert_array_equal(next(resumed)["inputs"], want["inputs"])

    whole = prepared.train_dataset(corpus, global_batch_size=8, seed=3)
    halves = [prepared.train_dataset(corpus, global_batch_size=8, seed=3, process_index=p, process_count=2)
              for p in range(2)]
    for step in range(4):
        rows = [h[step]["inputs"] for h in halves]
        np.testing.assert_array_equal(np.concatenate(rows), whole[step]["inputs"])
        assert not {r.tobytes() for r in rows[0]} & {r.tobytes() for r in rows[1]}


def metrics(workdir, key: str) -> dict:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {m["step"]: m[key] for m in map(json.loads, f) if key in m}


def _writer_peak(tmp_path, name: str, files: int) -> int:
    glob = write_corpus(tmp_path / name, files=files, words_per_file=20_000, seed=files)
    out = tmp_path / f"{name}_corpus"
    units = prepared.source_units(name="jaxlm_text_files", split="train", files=glob, unit_bytes=300_000)
    tokenizer_dir = byte_tokenizer(out)
    tracemalloc.start()
    prepared.prepare(out, "train", units, tokenizer_dir=tokenizer_dir, seq_len=128, workers=1)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_preparing_a_corpus_ten_times_larger_takes_less_than_twice_the_memory(tmp_path):
    small = _writer_peak(tmp_path, "small", files=10)  # 1 MB of text
    large = _writer_peak(tmp_path, "large", files=100)  # 10 MB
    assert large < 2 * small, (small, large)


def tiny_run_config(files: str, data_dir: str):
    config = config_lib.default_config()
    config.data.update(dict(name="jaxlm_text_files", files=files, tokenizer="byte", seq_len=16, data_dir=data_dir))
    config.model.update(dict(num_layers=1, num_heads=2, emb_dim=16, max_len=16))
    config.train.update(dict(steps=4, batch_size=4, log_every=2, eval_every=4, eval_batches=2, peak_flops=1e9))
    config.checkpoint.update(dict(every=4, async_save=False))
    config.sample.max_new_tokens = 0
    config.mesh.num_devices = 1
    return config


@pytest.mark.slow  # about 60 s: the tool in a process of its own, two runs
def test_a_run_on_the_shards_of_the_tool_logs_the_losses_of_the_in_memory_run(tmp_path, data_dir):
    files = write_corpus(tmp_path / "text", files=12, words_per_file=400)
    # Train: the files but 0 and 10, joined by EOS. Lengthen the last so that no token is left over
    # from whole windows at any epoch offset: the in-memory path then shuffles as many windows.
    train_files = [p for i, p in enumerate(sorted(glob.glob(files))) if i % 10]
    length = sum(os.path.getsize(p) for p in train_files) + len(train_files) - 1
    with open(train_files[-1], "a") as f:
        f.write("x" * ((16 - length) % 17))
    config = tiny_run_config(files, data_dir)
    out = tmp_path / "corpus"
    result = subprocess.run([sys.executable, os.path.join(REPO, "tools", "prepare_data.py"),
                             f"--config={os.path.join(REPO, 'configs', 'gpt_corpus.py')}",
                             f"--output={out}", f"--config.data.files={files}", "--config.data.seq_len=16",
                             f"--config.data.data_dir={data_dir}", "--workers=1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "train: documents=10" in result.stdout and "validation: documents=2" in result.stdout

    # Within the first epoch both paths shuffle the same windows with the same seed.
    stream = lm.token_stream(name="jaxlm_text_files", split="train", tokenizer=tokenizers.create("byte"),
                             files=files, data_dir=data_dir)
    assert (len(stream) - 16) // 17 == len(stream) // 17 == prepared.Corpus(out, "train").manifest["windows"]
    loop.train_and_evaluate(config.copy_and_resolve_references(), str(tmp_path / "memory"))
    config.data.prepared = str(out)
    loop.train_and_evaluate(config.copy_and_resolve_references(), str(tmp_path / "shards"))
    for key in ("train/loss", "eval/loss"):
        memory, shards = (metrics(tmp_path / run, key) for run in ("memory", "shards"))
        assert sorted(shards) == sorted(memory) and shards
        np.testing.assert_allclose([shards[s] for s in sorted(shards)], [memory[s] for s in sorted(memory)], rtol=1e-5)


def test_a_run_refuses_a_corpus_of_another_tokenizer_or_seq_len(tmp_path, data_dir):
    files = write_corpus(tmp_path / "text", files=12, words_per_file=200)
    out = tmp_path / "corpus"
    for split in ("train", "validation"):
        prepared.prepare(out, split, prepared.source_units(name="jaxlm_text_files", split=split, files=files),
                         tokenizer_dir=byte_tokenizer(out), seq_len=16, workers=1)
    config = tiny_run_config(files, data_dir)
    config.data.update(dict(prepared=str(out), tokenizer="char"))
    with pytest.raises(ValueError, match=r"tokenized with a 'byte' tokenizer but data.tokenizer='char'"):
        loop.train_and_evaluate(config.copy_and_resolve_references(), str(tmp_path / "run_char"))
    assert not (tmp_path / "run_char" / "tokenizer").exists()
    config.data.update(dict(tokenizer="byte", seq_len=8))
    with pytest.raises(ValueError, match=r"holds windows of seq_len=16 but data.seq_len=8"):
        loop.train_and_evaluate(config.copy_and_resolve_references(), str(tmp_path / "run_short"))
    config.data.seq_len = 16
    manifest_path = out / "train" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["tokenizer"]["fingerprint"] = "sentencepiece-0123"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"prepared with the 'byte' tokenizer 'sentencepiece-0123'.*"
                                         r"this run's tokenizer is the 'byte' tokenizer 'byte'"):
        loop.train_and_evaluate(config.copy_and_resolve_references(), str(tmp_path / "run_other"))


@pytest.mark.parametrize("name, text_key", [("jaxlm_tiny_shakespeare", "text"), ("jaxlm_multi30k", "en")])
def test_a_data_set_by_name_prepares_to_the_in_memory_windows(tmp_path, data_dir, name, text_key):
    """Documents of a TFDS data set in ranges (Multi30k: 4 ranges of 300), or one document stored
    in chunks (Tiny Shakespeare) tokenized as one text, as the in-memory path does."""
    if not (builders.jaxlm_data_dir() / {"jaxlm_tiny_shakespeare": "tinyshakespeare",
                                         "jaxlm_multi30k": "multi30k"}[name]).is_dir():
        pytest.skip(f"{name} is not under JAXLM_DATA_DIR")
    units = prepared.source_units(name=name, split="validation", data_dir=data_dir, text_key=text_key,
                                  documents_per_unit=300)
    assert len(units) == (1 if name == "jaxlm_tiny_shakespeare" else 4)
    out = tmp_path / "corpus"
    prepared.prepare(out, "validation", units, tokenizer_dir=byte_tokenizer(out), seq_len=32, workers=2)
    corpus = prepared.Corpus(out, "validation")
    stream = lm.token_stream(name=name, split="validation", tokenizer=tokenizers.create("byte"), data_dir=data_dir,
                             text_key=text_key)
    np.testing.assert_array_equal(corpus.windows(range(len(corpus))), lm.pack(stream, 32))
