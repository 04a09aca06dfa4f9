"""Instruction tuning: a decoder learns the assistant turns of chat conversations.

Data (`jaxlm.data.sft`): `data.files='train=PATH,validation=PATH'`, JSONL conversations, rendered
by the tokenizer's chat template; the loss covers the assistant's tokens only; examples are packed
into rows of `data.seq_len` (`task.pack`) with segment ids and positions reset per example, so
attention never crosses examples. Every decoder family runs it (GPT, and the Llama-class imports
through `init_from`); LoRA and QLoRA through `peft`, as for any task.

Evaluation: the teacher-forced loss and token accuracy on the assistant tokens of the eval split,
and by generation: greedy answers to the eval conversations (up to the last assistant turn) scored
against that turn per `"task"` of the JSONL lines, with the metric `task.task_metrics` names
(`TASK=METRIC,...`; exact_match for the others): exact_match, accuracy (case and surrounding space
ignored), bleu (sacrebleu), entity_f1 (answers written `TYPE: span; TYPE: span`, or `none`).
"""

from __future__ import annotations

import functools
import logging
import os

import jax.numpy as jnp
import numpy as np

from jaxlm.data import batching, builders, chat, progress, sft, tokenizers
from jaxlm.infer import sampling
from jaxlm.tasks import base
from jaxlm.tasks.causal_lm import CausalLM

METRICS = ("exact_match", "accuracy", "bleu", "entity_f1")
log = logging.getLogger("jaxlm")


def entities(text: str) -> set[tuple[str, str]]:
    """{(type, span)} of an answer written `TYPE: span; TYPE: span` ('none' or '' for none)."""
    found = set()
    for item in text.split(";"):
        kind, sep, span = item.partition(":")
        if sep and kind.strip() and span.strip():
            found.add((kind.strip().upper(), " ".join(span.split())))
    return found


def entity_answer(tokens: list[str], tags: list[str]) -> str:
    """The answer `entities` reads, written from IOB2 tags: `TYPE: span; ...` in order, or 'none'."""
    spans, current = [], None
    for token, tag in zip(tokens, tags):
        if tag.startswith("B-") or (tag.startswith("I-") and (current is None or current[0] != tag[2:])):
            current = [tag[2:], [token]]
            spans.append(current)
        elif tag.startswith("I-"):
            current[1].append(token)
        else:
            current = None
    return "; ".join(f"{kind}: {' '.join(words)}" for kind, words in spans) or "none"


def score(metric: str, predictions: list[str], references: list[str]) -> float:
    """`metric` of the predictions against the references (a share, or BLEU points)."""
    if metric == "exact_match":
        return float(np.mean([p.strip() == r.strip() for p, r in zip(predictions, references)]))
    if metric == "accuracy":
        return float(np.mean([p.strip().lower() == r.strip().lower() for p, r in zip(predictions, references)]))
    if metric == "bleu":
        import sacrebleu  # pylint: disable=import-outside-toplevel

        return sacrebleu.corpus_bleu(predictions, [references]).score
    if metric == "entity_f1":
        hits = found = wanted = 0
        for p, r in zip(predictions, references):
            p, r = entities(p), entities(r)
            hits, found, wanted = hits + len(p & r), found + len(p), wanted + len(r)
        return 2 * hits / max(found + wanted, 1) if found + wanted else 1.0
    raise ValueError(f"unknown generation metric {metric!r}; choose from {METRICS}")


def task_metrics(setting: str) -> dict[str, str]:
    """{task: metric} of `task.task_metrics` ('translate=bleu,sentiment=accuracy')."""
    chosen = {}
    for item in filter(None, (i.strip() for i in setting.split(","))):
        name, sep, metric = (p.strip() for p in item.partition("="))
        if not sep or not name or metric not in METRICS:
            raise ValueError(f"task.task_metrics={setting!r}: write TASK=METRIC with METRIC one of {METRICS} "
                             f"(got {item!r})")
        chosen[name] = metric
    return chosen


class SFT(CausalLM, base.Predicts):
    """Batches are packed rows: inputs, targets, weights (1 on assistant tokens), segment_ids,
    positions, all [b, seq_len]."""

    def __init__(self, config, tokenizer):
        super().__init__(config, tokenizer)
        self.metrics = task_metrics(config.task.task_metrics)
        self.paths = builders.files_per_split("task sft", config.data.files)

    def dummy_batch(self):
        shape = (1, self.config.data.seq_len)
        return {"inputs": jnp.zeros(shape, jnp.int32), "positions": jnp.zeros(shape, jnp.int32),
                "segment_ids": jnp.ones(shape, jnp.int32)}

    def model_inputs(self, batch):
        return {"tokens": batch["inputs"], "positions": batch["positions"], "segment_ids": batch["segment_ids"]}

    def conversations(self, split: str, data_path: str = "") -> list[sft.Conversation]:
        if data_path:
            return sft.read_jsonl(data_path)
        if split not in self.paths:
            raise ValueError(f"data.files names no {split!r} file (it names {sorted(self.paths)}); "
                             f"add {split}=PATH to data.files")
        return _read(self.paths[split])

    @classmethod
    def build_tokenizer(cls, config, workdir: str):
        """A sentencepiece model trained on the train conversations (as the plain template renders
        them) when `data.tokenizer_path` is empty; a 'char' vocabulary has no source here."""
        d = config.data
        directory = os.path.join(workdir, tokenizers.TOKENIZER_DIR)
        if d.tokenizer == "char":
            raise ValueError("task sft needs data.tokenizer byte, sentencepiece, wordpiece or huggingface, not "
                             "'char' (its vocabulary would come from another data set)")
        if d.tokenizer == "sentencepiece" and not d.tokenizer_path and not tokenizers.exists(directory):
            texts = (chat.render(None, list(c.messages), template=chat.PLAIN_TEMPLATE)
                     for c in _read(builders.files_per_split("task sft", d.files)["train"]))
            model = tokenizers.train_sentencepiece(texts, vocab_size=d.tokenizer_vocab_size, keep_whitespace=True,
                                                   path=os.path.join(directory, tokenizers.SENTENCEPIECE_FILE))
            return tokenizers.build_tokenizer("sentencepiece", workdir=workdir, name=d.name, model_path=model)
        return super().build_tokenizer(config, workdir)

    def rows(self, split: str) -> dict[str, np.ndarray]:
        """The packed rows of `split`; the train split's conversations are shuffled (the seed) first,
        so that rows mix the tasks of a file written task by task."""
        conversations = self.conversations(split)
        if split == self.config.data.train_split:
            order = np.random.default_rng(self.config.seed).permutation(len(conversations))
            conversations = [conversations[i] for i in order]
        rows, stats = sft.pack([sft.encode(c, self.tokenizer) for c in conversations], self.config.data.seq_len,
                               packed=self.config.task.pack)
        log.info("sft %s: %d examples in %d rows, packing efficiency %.1f%% of tokens are not padding "
                 "(%d cut to seq_len, %d without a learned token dropped)", split, stats["examples"],
                 stats["rows"], 100 * stats["efficiency"], stats["truncated"], stats["dropped"])
        return rows

    def train_iterator(self):
        c = self.config
        ds = sft.train_dataset(self.rows(c.data.train_split), global_batch_size=c.train.batch_size, seed=c.seed,
                               **self.process_kwargs())
        return batching.iterate(ds)

    def eval_batches(self, split: str, max_batches: int):
        return sft.eval_batches(self.rows(split), global_batch_size=self.config.train.batch_size,
                                max_batches=max_batches, **self.process_kwargs())

    # Evaluation by generation.

    def answers(self, params, prompts: list[np.ndarray]) -> list[str]:
        """Greedy answers (the tokenizer's stop ids end them) to a list of prompt token arrays."""
        pad_id = self.tokenizer.pad_id or 0
        out, batch = [], self.config.train.batch_size
        for start in progress.progress(range(0, len(prompts), batch), desc="generating answers"):
            chunks = list(sampling.stream(self.model, params, prompts[start : start + batch],
                                          self.config.task.generate_tokens, stop_ids=self.tokenizer.stop_ids,
                                          pad_id=pad_id,
                                          vocab_size=self.tokenizer.vocab_size))
            tokens = np.concatenate(chunks, axis=1)
            out += [self.tokenizer.decode([t for t in row if t >= 0]) for row in tokens]
        end = sft.turn_end(self.tokenizer)
        return [(text.split(end)[0] if end else text).strip() for text in out]

    def predictions(self, params, split: str, data_path: str = "", limit: int = 0):
        """({metric per task}, a row per conversation: task, prompt, reference, prediction)."""
        conversations = self.conversations(split, data_path)
        if limit > 0:
            conversations = conversations[:limit]
        asked = [sft.prompt(c, self.tokenizer) for c in conversations]
        predictions = self.answers(params, [p for p, _ in asked])
        rows = [{"index": i, "task": c.task, "prompt": sft.last_question(c), "reference": ref, "prediction": pred}
                for i, (c, (_, ref), pred) in enumerate(zip(conversations, asked, predictions))]
        metrics = {}
        for name in sorted({r["task"] for r in rows}):
            mine = [r for r in rows if r["task"] == name]
            metric = self.metrics.get(name, "exact_match")
            metrics[f"{name}/{metric}"] = score(metric, [r["prediction"] for r in mine],
                                                [r["reference"] for r in mine])
        return metrics, rows

    def generation_metrics(self, params, split: str) -> dict:
        if self.config.task.eval_generate < 0:
            return {}
        return self.predictions(params, split, limit=self.config.task.eval_generate)[0]

    def predict_text(self, params, text: str) -> dict:
        conversation = sft.Conversation(({"role": "user", "content": text}, {"role": "assistant", "content": ""}))
        return {"prompt": text, "answer": self.answers(params, [sft.prompt(conversation, self.tokenizer)[0]])[0]}

    def sample(self, params) -> str | None:
        _, rows = self.predictions(params, self.config.data.eval_split, limit=3)
        return "\n".join(f"[{r['task']}] {r['prompt']}\nreference:  {r['reference']}\nprediction: {r['prediction']}"
                         for r in rows)


@functools.lru_cache(maxsize=4)
def _read(path: str) -> list[sft.Conversation]:
    return sft.read_jsonl(path)
