"""Fine-tuning an encoder (BERT) with task heads: sentence classification and token tagging.

Batches are those of `jaxlm.data.labeled` (input_ids, segment_ids, input_mask, then `label` [b]
or `tags` [b, length]); -1 marks rows and positions without a target. Losses are summed over
the targets with their count as the weight, so gradient accumulation and sharding stay exact.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.data import labeled, mlm, progress
from jaxlm.models import bert
from jaxlm.tasks import base, entity_f1

ENCODER_KEYS = ("input_ids", "segment_ids", "input_mask")


class EncoderTask(base.Task, base.Predicts):
    """What the text tasks on a BERT encoder share: WordPiece inputs, examples by split, the
    forward pass with the task's heads, and predictions for `jaxlm.evaluate` / `jaxlm.predict`.

    Subclasses give their head's input (`HEAD_SOURCE`) and target key (`TARGET`) and implement
    `read(split, data_path)` -> (examples, names), `encode(example)`, `text_example(text)`,
    `example_row(...)` and `score_rows(rows)`. `head` names the head's layer (a
    multi-task run gives every task its own).
    """

    families = ("bert",)

    HEAD_SOURCE = "pooled"
    TARGET = "label"  # the batch key of the targets (-1: none)
    encoder_keys = ENCODER_KEYS  # the batch keys the model takes
    own_layers = ()  # regexes of new input layers, trained under every PEFT method as the head is
    model_kwargs = {}  # more arguments of the model (bert.from_config)

    def __init__(self, config, tokenizer, head: str = "classifier"):
        self.head = head
        self.heads = (rf"^{head}/", *self.own_layers)
        super().__init__(config, tokenizer)
        d, m = config.data, config.model
        if d.seq_len > m.max_len:
            raise ValueError(f"data.seq_len={d.seq_len} exceeds model.max_len={m.max_len}")
        self.specials, extra_ids = mlm.specials_for(tokenizer)
        self.set_vocab_size(tokenizer.vocab_size + extra_ids)
        self.tokens_per_example = d.seq_len
        self._examples = {}
        self.names = self.examples(d.train_split)[1]
        self.model = self.build_model(heads=self.head_specs(), **self.model_kwargs)

    def head_specs(self) -> tuple:
        return ((self.head, self.HEAD_SOURCE, len(self.names)),)

    def loss(self, params, batch, rng=None, train: bool = False):
        return self.loss_from(self.forward(params, batch, rng, train), batch)

    def loss_from(self, out, batch):
        """Summed cross-entropy of the head's logits over the targets that are not -1."""
        targets = batch[self.TARGET]
        loss, correct, weight = base.cross_entropy(out[self.head], jnp.maximum(targets, 0),
                                                   (targets >= 0).astype(jnp.float32))
        return loss, {"loss": loss, "correct": correct, "weight": weight}

    @staticmethod
    def summarize(sums: dict) -> dict:
        return base.mean_metrics(sums)

    def examples(self, split: str, data_path: str = ""):
        """(examples, label or tag names) of a split, or of a file in the data set's format."""
        key = (split, data_path)
        if key not in self._examples:
            self._examples[key] = self.read(split, data_path)
        return self._examples[key]

    def dummy_batch(self):
        ids = jnp.zeros((1, self.config.data.seq_len), jnp.int32)
        return {**{k: ids for k in self.encoder_keys}, "input_mask": ids + 1}

    def model_inputs(self, batch):
        return {k: batch[k] for k in self.encoder_keys}

    def forward(self, params, batch, rng=None, train: bool = False) -> dict:
        return self.model.apply({"params": params}, **self.model_inputs(batch), deterministic=not train,
                                rngs=self.rngs(rng, train))

    def train_iterator(self):
        c = self.config
        return labeled.train_iterator(self.examples(c.data.train_split)[0], self.encode,
                                      global_batch_size=c.train.batch_size, seed=c.seed,
                                      bucket_batches=c.data.bucket_batches, **self.process_kwargs())

    def eval_batches(self, split: str, max_batches: int, data_path: str = ""):
        return labeled.eval_batches(self.examples(split, data_path)[0], self.encode,
                                    batch_size=self.config.train.batch_size, max_batches=max_batches,
                                    **self.process_kwargs())

    def fit_length(self, batches):
        """Dynamic padding: cut the stacked batches' token axis to the longest row rounded up to
        `data.pad_multiple`, so short sentences cost short steps (a handful of compiled lengths).
        Several processes would each cut their own rows differently: they keep `data.seq_len`."""
        return base.cut_to_longest(self.config, batches, int(batches["input_mask"].sum(-1).max()),
                                   (*self.encoder_keys, "tags"))  # the arrays with a token axis (last)

    def tokens_in(self, batches):
        return batches["input_ids"].shape[-1]

    @functools.cached_property
    def _predict(self):
        return jax.jit(lambda params, batch: self.forward(params, batch))

    def predictions(self, params, split: str, data_path: str = "") -> tuple[dict, list[dict]]:
        """(metrics, one row per example) over a whole split or file."""
        examples, _ = self.examples(split, data_path)
        rows = []
        batches = self.eval_batches(split, 0, data_path)
        for batch in progress.progress(batches, desc=f"predicting ({split or data_path})", total=len(batches)):
            out = jax.device_get(self._predict(params, self.model_inputs(batch)))
            for i in np.flatnonzero(batch["index"] >= 0):
                index = int(batch["index"][i])
                rows.append({"index": index, **self.example_row(examples[index], out, batch, i)})
        return self.score_rows(rows), rows

    def predict_text(self, params, text: str) -> dict:
        """The prediction for raw text (what `jaxlm.predict` prints)."""
        example = self.text_example(text)
        batch = jax.tree.map(lambda x: x[None], self.encode(example))
        out = jax.device_get(self._predict(params, self.model_inputs(batch)))
        row = self.example_row(example, out, batch, 0)
        return {k: v for k, v in row.items() if not k.startswith("true_")}


class SequenceClassification(EncoderTask):
    """One label per text (SST-2) from the pooled [CLS] vector; metric `accuracy`."""

    def read(self, split, data_path):
        d = self.config.data
        return labeled.classification_source(d.name, split, data_dir=d.data_dir, files=d.files,
                                             data_path=data_path)

    def encode(self, example):
        text, label = example
        return {**labeled.encode_text(self.tokenizer, text, self.config.data.seq_len, self.specials),
                "label": np.int32(label)}

    def text_example(self, text):
        return (text, labeled.IGNORE)

    def example_row(self, example, out, batch, i):
        probs = jax.nn.softmax(out[self.head][i])
        predicted = int(np.argmax(probs))
        row = {"text": example[0], "prediction": self.names[predicted], "probability": float(probs[predicted])}
        if example[1] >= 0:
            row["true_label"] = self.names[example[1]]
        return row

    def score_rows(self, rows):
        scored = [r for r in rows if "true_label" in r]
        return {"accuracy": float(np.mean([r["prediction"] == r["true_label"] for r in scored])),
                "examples": len(scored)}


class TokenClassification(EncoderTask):
    """A tag per word (CoNLL NER) from each word's first piece; metrics entity-level `f1`,
    `precision`, `recall` (as `seqeval` counts them) besides the token loss and accuracy.

    With `data.case_feature` every piece also carries its word's capitalisation
    (`labeled.word_shape`) into a new, trained embedding added to the input embeddings
    (`bert.CASE_EMBEDDING`): an uncased vocabulary lower-cases "Paris", "EU" and "may" alike.
    """

    HEAD_SOURCE = "hidden"
    TARGET = "tags"

    def __init__(self, config, tokenizer, head: str = "classifier"):
        if config.data.case_feature:
            self.encoder_keys = ENCODER_KEYS + ("case_ids",)
            self.own_layers = (rf"^{bert.CASE_EMBEDDING}$",)
            self.model_kwargs = {"case_vocab_size": labeled.CASE_SHAPES}
        super().__init__(config, tokenizer, head)

    def read(self, split, data_path):
        d = self.config.data
        return labeled.tagging_source(d.name, split, data_dir=d.data_dir, files=d.files, data_path=data_path)

    def encode(self, example):
        words, tags = example
        return labeled.encode_words(self.tokenizer, words, tags, self.config.data.seq_len, self.specials,
                                    self.config.data.case_feature)

    def text_example(self, text):
        words = text.split()
        return (words, [0] * len(words))  # any tag: it marks each word's first piece

    def example_row(self, example, out, batch, i):
        words, tags = example
        firsts = np.flatnonzero(batch["tags"][i] >= 0)  # each kept word's first piece, in order
        predicted = [self.names[t] for t in np.argmax(out[self.head][i][firsts], -1)]
        predicted += ["O"] * (len(words) - len(predicted))  # words cut off by data.seq_len
        row = {"words": list(words), "predicted": predicted}
        if min(tags, default=0) >= 0:
            row["true_tags"] = [self.names[t] for t in tags]
        return row

    def score_rows(self, rows):
        return entity_f1.entity_scores([r["true_tags"] for r in rows], [r["predicted"] for r in rows])

    def generation_metrics(self, params, split: str) -> dict:
        return self.predictions(params, split)[0]
