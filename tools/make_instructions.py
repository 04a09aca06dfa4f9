r"""Writes an instruction-tuning mixture (JSONL chat lines) from the local data sets.

    python tools/make_instructions.py --output=/tmp/instructions [--per_task=5000] [--eval_per_task=200]

Three tasks, each line `{"task": ..., "messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`:
- `translate`: Multi30k "Translate English to German: <en>" -> the German sentence;
- `sentiment`: SST-2 "Is the sentiment of this review positive or negative? <text>" -> positive|negative;
- `entities`: CoNLL-2003 "List the named entities (PER, ORG, LOC, MISC) in: <sentence>" ->
  "PER: John Smith; LOC: Paris" in order of appearance, or "none".
Train lines come from the train splits (the first --per_task of a seeded shuffle, per task),
validation lines from the validation splits (--eval_per_task each). Writes OUTPUT/train.jsonl and
OUTPUT/validation.jsonl (tasks interleaved) and prints the counts. Train with
`configs/sft_mixture.py` (task.task_metrics: translate=bleu, sentiment=accuracy, entities=entity_f1).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from jaxlm.data import builders, readers  # noqa: E402
from jaxlm.tasks.sft import entity_answer  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("output", None, "Directory for train.jsonl and validation.jsonl.")
flags.DEFINE_integer("per_task", 5000, "Train conversations per task (0: all).")
flags.DEFINE_integer("eval_per_task", 200, "Validation conversations per task (0: all).")
flags.DEFINE_integer("seed", 0, "Which examples are taken.")
flags.mark_flag_as_required("output")

SENTIMENT = {"0": "negative", "1": "positive"}


def conversation(task: str, question: str, answer: str) -> dict:
    return {"task": task, "messages": [{"role": "user", "content": question},
                                       {"role": "assistant", "content": answer}]}


def task_lines(split: str) -> dict[str, list[dict]]:
    root = builders.jaxlm_data_dir()
    multi30k = "train" if split == "train" else "val"
    pairs = readers.read_aligned(root / "multi30k" / f"{multi30k}.en.gz", root / "multi30k" / f"{multi30k}.de.gz")
    texts, labels = readers.read_tsv(root / "sst2" / ("train.tsv" if split == "train" else "dev.tsv"))
    sentences = readers.read_conll(root / "conll2003" / ("train.txt" if split == "train" else "valid.txt"))
    return {
        "translate": [conversation("translate", f"Translate English to German: {en}", de) for en, de in pairs],
        "sentiment": [conversation("sentiment", f"Is the sentiment of this review positive or negative? {t}",
                                   SENTIMENT[label]) for t, label in zip(texts, labels)],
        "entities": [conversation("entities", f"List the named entities (PER, ORG, LOC, MISC) in: {' '.join(tok)}",
                                  entity_answer(tok, tags)) for tok, tags in sentences],
    }


def mixture(split: str, per_task: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    chosen = []
    for lines in task_lines(split).values():
        order = rng.permutation(len(lines))
        chosen.append([lines[i] for i in (order[:per_task] if per_task else order)])
    # Interleaved: task 0, 1, 2, 0, 1, 2, ... (a file read from its start sees every task).
    longest = max(len(c) for c in chosen)
    return [c[i] for i in range(longest) for c in chosen if i < len(c)]


def main(argv):
    del argv
    os.makedirs(FLAGS.output, exist_ok=True)
    for split, count in (("train", FLAGS.per_task), ("validation", FLAGS.eval_per_task)):
        lines = mixture(split, count, FLAGS.seed)
        path = os.path.join(FLAGS.output, f"{split}.jsonl")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
        os.replace(path + ".tmp", path)
        counts = {task: sum(line["task"] == task for line in lines) for task in ("translate", "sentiment", "entities")}
        print(f"{path}: {len(lines)} conversations {counts}")


if __name__ == "__main__":
    app.run(main)
