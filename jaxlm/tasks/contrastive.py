"""Contrastive sentence embeddings: one BERT encodes both sides of a pair (a bi-encoder).

A sentence's embedding is the mean of the last hidden states over its real tokens (the
attention mask), L2-normalised, as sentence-transformers' all-MiniLM models pool. The loss is
CLIP's symmetric InfoNCE with in-batch negatives: over the b x b cosine similarities of a batch
times a learned scale exp(log_scale) (at most `MAX_SCALE`), the cross-entropy of each a against
every b and of each b against every a, averaged. `log_scale` is a top-level parameter beside
BERT's (it starts at log(1 / task.temperature)), so it trains and is checkpointed with them
under every PEFT method.

`task.contrastive` picks the training examples:

  pairs   (data.source_key, data.target_key) sentence pairs of `data.name`, e.g. Multi30k
          en-de: a cross-lingual retrieval bi-encoder.
  simcse  unsupervised SimCSE: every text (`data.text_key` of `data.name`) is both a and b. The
          two views differ only by dropout (model.dropout > 0): both rows run in ONE forward
          pass over the doubled batch, so each draws its own masks.

Batches hold both sides: `input_ids`, `segment_ids`, `input_mask` int32[b, 2, seq_len] (a at
[:, 0], b at [:, 1]; eval batches add `index`). Rows whose mask is all zero (eval padding) take
no part in the loss, neither as anchors nor as negatives. Losses are summed over rows with the
row count as the weight; with `train.microbatches` > 1 the negatives are those of each
microbatch.

Evaluation adds `retrieval_top1` (`generation_metrics`): the first `task.retrieval_pairs` pairs
of the eval split (0: all; Multi30k validation has 1,014) are embedded on both sides, and each
source retrieves the target of highest cosine similarity and each target the source:
`retrieval_{source}_to_{target}`, `retrieval_{target}_to_{source}` and their mean
`retrieval_top1`. `task.retrieval_pairs=-1` turns it off (e.g. SimCSE on plain text).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlm.data import builders, labeled, mlm, readers
from jaxlm.models.layers import mean_pool
from jaxlm.tasks import base

ENCODER_KEYS = ("input_ids", "segment_ids", "input_mask")
SCALE = "log_scale"  # the top-level parameter: the similarity scale is exp(log_scale)
MAX_SCALE = 100.0  # CLIP's clamp of the scale (a temperature of at least 0.01)
VARIANTS = ("pairs", "simcse")


def pool(hidden: jax.Array, input_mask: jax.Array) -> jax.Array:
    """L2-normalised mean of `hidden` [n, l, e] over the positions where `input_mask` [n, l] is
    set (float32 [n, e]); a row without any (padding) gives zeros."""
    mean = mean_pool(hidden, input_mask)
    return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


def scale_of(log_scale: jax.Array) -> jax.Array:
    """The similarity scale exp(log_scale), clamped to at most `MAX_SCALE`."""
    return jnp.minimum(jnp.exp(log_scale.astype(jnp.float32)), MAX_SCALE)


def info_nce(a: jax.Array, b: jax.Array, scale: jax.Array, valid: jax.Array | None = None) -> dict:
    """Symmetric in-batch InfoNCE over unit embeddings `a`, `b` [n, e] (row i of a pairs with
    row i of b), summed over the `valid` rows (bool [n]; default all).

    Returns sums: `loss` (the mean of the a->b and b->a cross-entropies, per row), `correct`
    (rows whose a ranks its own b first), `weight` (the valid rows) and `scale` (the scale
    times the weight, so that its mean survives summing over microbatches and batches).
    """
    n = a.shape[0]
    valid = jnp.ones((n,), bool) if valid is None else valid
    logits = scale * (a.astype(jnp.float32) @ b.astype(jnp.float32).T)  # [a, b]
    targets = jnp.arange(n)
    neg = jnp.finfo(jnp.float32).min
    a_to_b = jnp.where(valid[None, :], logits, neg)  # padding rows are no negatives
    b_to_a = jnp.where(valid[None, :], logits.T, neg)
    losses = 0.5 * (optax.softmax_cross_entropy_with_integer_labels(a_to_b, targets)
                    + optax.softmax_cross_entropy_with_integer_labels(b_to_a, targets))
    weights = valid.astype(jnp.float32)
    correct = (jnp.argmax(a_to_b, -1) == targets).astype(jnp.float32)
    weight = weights.sum()
    return {"loss": jnp.sum(jnp.where(valid, losses, 0.0)), "correct": jnp.sum(correct * weights),
            "weight": weight, "scale": scale * weight}


def retrieval_scores(source: np.ndarray, target: np.ndarray, names=("source", "target")) -> dict:
    """Top-1 retrieval accuracy both ways between unit embeddings [n, e] whose row i pairs with
    row i: `retrieval_{a}_to_{b}`, `retrieval_{b}_to_{a}` (a, b = `names`) and their mean
    `retrieval_top1`."""
    similarity = np.asarray(source, np.float32) @ np.asarray(target, np.float32).T
    truth = np.arange(len(similarity))
    forward = float(np.mean(np.argmax(similarity, 1) == truth))
    backward = float(np.mean(np.argmax(similarity, 0) == truth))
    a, b = names
    return {f"retrieval_{a}_to_{b}": forward, f"retrieval_{b}_to_{a}": backward,
            "retrieval_top1": (forward + backward) / 2}


class Contrastive(base.Task, base.Predicts):
    """Contrastive training of a BERT bi-encoder (see the module docstring)."""

    families = ("bert",)

    heads = (rf"^{SCALE}$",)

    def __init__(self, config, tokenizer):
        super().__init__(config, tokenizer)
        c, d, m = config.task, config.data, config.model
        if c.contrastive not in VARIANTS:
            raise ValueError(f"task.contrastive={c.contrastive!r}: expected one of {list(VARIANTS)}")
        if d.seq_len > m.max_len:
            raise ValueError(f"data.seq_len={d.seq_len} exceeds model.max_len={m.max_len}")
        if c.contrastive == "simcse" and m.dropout <= 0:
            raise ValueError("task.contrastive='simcse' needs model.dropout > 0: dropout is what "
                             "makes the two views of a text differ")
        if c.temperature <= 0:
            raise ValueError(f"task.temperature={c.temperature} must be positive")
        self.specials, extra_ids = mlm.specials_for(tokenizer)
        self.set_vocab_size(tokenizer.vocab_size + extra_ids)
        self.tokens_per_example = 2 * d.seq_len  # both sides run through the encoder
        self._examples = {}
        self._targets = None  # (params, eval-split target embeddings) for predict_text
        self.model = self.build_model(heads=())

    # Parameters and the forward pass.

    def init(self, rng):
        variables = super().init(rng)
        log_scale = jnp.asarray(math.log(1.0 / self.config.task.temperature), jnp.float32)
        return {**variables, "params": {**variables["params"], SCALE: log_scale}}

    def dummy_batch(self):
        ids = jnp.zeros((1, 2, self.config.data.seq_len), jnp.int32)
        return {"input_ids": ids, "segment_ids": ids, "input_mask": ids + 1}

    def model_inputs(self, batch):
        """The encoder's rows [n, l]: a pair batch [b, 2, l] becomes rows a0, b0, a1, b1, ..."""
        return {k: batch[k].reshape(-1, batch[k].shape[-1]) for k in ENCODER_KEYS}

    def embed(self, params, inputs: dict, rng=None, train: bool = False) -> jax.Array:
        """Unit sentence embeddings float32 [n, e] of encoder rows `inputs` (keys ENCODER_KEYS,
        [n, l]); with `train` each row draws its own dropout masks."""
        bert = {k: v for k, v in params.items() if k != SCALE}
        out = self.model.apply({"params": bert}, **inputs, deterministic=not train,
                               rngs=self.rngs(rng, train))
        return pool(out["hidden"], inputs["input_mask"])

    def loss(self, params, batch, rng=None, train: bool = False):
        pairs = self.embed(params, self.model_inputs(batch), rng, train).reshape(
            *batch["input_mask"].shape[:2], -1)  # [b, 2, e]
        valid = batch["input_mask"].max(-1).min(-1) > 0  # both sides have tokens
        sums = info_nce(pairs[:, 0], pairs[:, 1], scale_of(params[SCALE]), valid)
        return sums["loss"], sums

    @staticmethod
    def summarize(sums: dict) -> dict:
        scale = sums["scale"] / jnp.maximum(sums["weight"], 1.0)
        return {**base.mean_metrics(sums), "temperature": 1.0 / jnp.maximum(scale, 1e-12)}

    # Data.

    def pairs(self, split: str, data_path: str = "") -> list[tuple[str, str]]:
        """(source, target) pairs of a split of `data.name`, or of two line-aligned files given
        as `data_path` 'SOURCE_FILE,TARGET_FILE' (as the seq2seq task reads them)."""
        key = ("pairs", split, data_path)
        if key not in self._examples:
            if data_path:
                files = data_path.split(",")
                if len(files) != 2:
                    raise ValueError(f"data_path={data_path!r}: retrieval reads two line-aligned files, "
                                     "given as 'SOURCE_FILE,TARGET_FILE'")
                self._examples[key] = readers.read_aligned(*files)
            else:
                d = self.config.data
                self._examples[key] = list(builders.get_pairs(
                    d.name, split, source_key=d.source_key, target_key=d.target_key,
                    data_dir=d.data_dir, files=d.files).iter_pairs())
        return self._examples[key]

    def examples(self, split: str) -> list:
        """The variant's examples: pairs, or texts (SimCSE) that serve as both sides."""
        if self.config.task.contrastive == "pairs":
            return self.pairs(split)
        key = ("texts", split)
        if key not in self._examples:
            d = self.config.data
            self._examples[key] = list(builders.get_source(d.name, split, data_dir=d.data_dir, files=d.files,
                                                           text_key=d.text_key).iter_texts())
        return self._examples[key]

    def encode_text(self, text: str) -> dict:
        return labeled.encode_text(self.tokenizer, text, self.config.data.seq_len, self.specials)

    def encode(self, example) -> dict:
        """A pair (a, b), or a text that is both sides, as arrays [2, seq_len]."""
        if isinstance(example, str):
            row = self.encode_text(example)
            return {k: np.stack([row[k], row[k]]) for k in ENCODER_KEYS}
        rows = [self.encode_text(text) for text in example]
        return {k: np.stack([row[k] for row in rows]) for k in ENCODER_KEYS}

    def train_iterator(self):
        c = self.config
        return labeled.train_iterator(self.examples(c.data.train_split), self.encode,
                                      global_batch_size=c.train.batch_size, seed=c.seed, **self.process_kwargs())

    def eval_batches(self, split: str, max_batches: int):
        return labeled.eval_batches(self.examples(split), self.encode, batch_size=self.config.train.batch_size,
                                    max_batches=max_batches, **self.process_kwargs())

    def fit_length(self, batches):
        """Cuts the token axis to the longest row of either side, rounded up to
        `data.pad_multiple` (as the classification tasks do; one process only)."""
        return base.cut_to_longest(self.config, batches, int(batches["input_mask"].sum(-1).max()), ENCODER_KEYS)

    def tokens_in(self, batches):
        return 2 * batches["input_ids"].shape[-1]

    # Retrieval.

    @functools.cached_property
    def _embed(self):
        return jax.jit(lambda params, inputs: self.embed(params, inputs))

    def embed_texts(self, params, texts) -> np.ndarray:
        """Unit embeddings float32 [len(texts), e], in batches of one train step's rows."""
        rows = 2 * self.config.train.batch_size
        pad = {k: np.zeros(self.config.data.seq_len, np.int32) for k in ENCODER_KEYS}
        out = []
        for start in range(0, len(texts), rows):
            chunk = [self.encode_text(t) for t in texts[start:start + rows]]
            chunk += [pad] * (rows - len(chunk))  # one shape: one compile
            inputs = {k: np.stack([row[k] for row in chunk]) for k in ENCODER_KEYS}
            out.append(np.asarray(jax.device_get(self._embed(params, inputs))))
        if not out:
            return np.zeros((0, self.config.model.emb_dim), np.float32)
        return np.concatenate(out)[:len(texts)]

    def retrieval_pairs(self, split: str) -> list[tuple[str, str]]:
        """The first `task.retrieval_pairs` pairs of a split (all of them when it is not > 0)."""
        limit = self.config.task.retrieval_pairs
        pairs = self.pairs(split)
        return pairs[:limit] if limit > 0 else pairs

    def retrieve(self, params, pairs) -> tuple[dict, np.ndarray]:
        """(retrieval scores, similarity [n, n] of every source to every target) of `pairs`."""
        source = self.embed_texts(params, [a for a, _ in pairs])
        target = self.embed_texts(params, [b for _, b in pairs])
        d = self.config.data
        return retrieval_scores(source, target, (d.source_key, d.target_key)), source @ target.T

    def generation_metrics(self, params, split: str) -> dict:
        if self.config.task.retrieval_pairs < 0:
            return {}
        return self.retrieve(params, self.retrieval_pairs(split))[0]

    def predictions(self, params, split: str, data_path: str = "") -> tuple[dict, list[dict]]:
        """(retrieval scores, one row per source: its top target and whether it is the right
        one) over the retrieval pairs of a split, or over all pairs of two line-aligned files
        `data_path` ('SOURCE_FILE,TARGET_FILE')."""
        pairs = self.pairs(split, data_path) if data_path else self.retrieval_pairs(split)
        scores, similarity = self.retrieve(params, pairs)
        rows = []
        for i, (source, target) in enumerate(pairs):
            j = int(np.argmax(similarity[i]))
            rows.append({"index": i, "source": source, "retrieved": pairs[j][1],
                         "similarity": float(similarity[i, j]), "correct": j == i, "true_target": target})
        return {**scores, "examples": len(pairs)}, rows

    def predict_text(self, params, text: str) -> dict:
        """The eval split's target sentence nearest to `text` (what `jaxlm.predict` prints)."""
        pairs = self.retrieval_pairs(self.config.data.eval_split)
        if self._targets is None or self._targets[0] is not params:  # embedded once per params
            self._targets = (params, self.embed_texts(params, [b for _, b in pairs]))
        similarity = self._targets[1] @ self.embed_texts(params, [text])[0]
        j = int(np.argmax(similarity))
        return {"text": text, "nearest": pairs[j][1], "similarity": float(similarity[j]), "index": j}
