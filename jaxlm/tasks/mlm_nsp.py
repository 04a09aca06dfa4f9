"""BERT pretraining: masked-LM (+ next-sentence prediction) on sentence pairs.

The loss is the masked-LM mean plus the NSP mean of the batch (as BERT sums the two means); a
batch therefore counts as weight 1, and gradient accumulation averages microbatch means.
"""

import math

import jax
import jax.numpy as jnp

from jaxlm.data import builders, mlm
from jaxlm.tasks import base

class MlmNsp(base.Task):
    """Batches are those of `jaxlm.data.mlm` (input_ids, segment_ids, input_mask, mlm_targets,
    mlm_weights, nsp_label)."""

    families = ("bert",)

    def __init__(self, config, tokenizer):
        super().__init__(config, tokenizer)
        d, t = config.data, config.task
        if d.seq_len > config.model.max_len:
            raise ValueError(f"data.seq_len={d.seq_len} exceeds model.max_len={config.model.max_len}")
        self.specials, extra_ids = mlm.specials_for(tokenizer)
        self.set_vocab_size(tokenizer.vocab_size + extra_ids)
        self.model = self.build_model()
        self.tokens_per_example = d.seq_len
        # Predictions per row the heads see: the masked share of a full row, with room for a
        # whole word over the budget; rows predict round(probability * tokens) positions.
        self.max_predictions = min(d.seq_len, math.ceil(t.mlm_probability * d.seq_len * 1.25) + 4)
        self._documents = {}

    def dummy_batch(self):
        length = self.config.data.seq_len
        ids = jnp.zeros((1, length), jnp.int32)
        return {"input_ids": ids, "segment_ids": ids, "input_mask": ids + 1,
                "mlm_weights": jnp.zeros((1, length), jnp.float32)}

    def model_inputs(self, batch):
        positions = jax.lax.top_k(batch["mlm_weights"], self.max_predictions)[1]
        return {"input_ids": batch["input_ids"], "segment_ids": batch["segment_ids"],
                "input_mask": batch["input_mask"], "mlm_positions": positions}

    def loss(self, params, batch, rng=None, train: bool = False):
        inputs = self.model_inputs(batch)
        out = self.model.apply({"params": params}, **inputs, deterministic=not train,
                               rngs=self.rngs(rng, train))
        gather = lambda x: jnp.take_along_axis(x, inputs["mlm_positions"], axis=1)
        mlm_loss, mlm_correct, mlm_weight = base.cross_entropy(
            out["mlm_logits"], gather(batch["mlm_targets"]), gather(batch["mlm_weights"]))
        sums = {"mlm_loss": mlm_loss, "mlm_correct": mlm_correct, "mlm_weight": mlm_weight,
                "dropped_predictions": jnp.sum(batch["mlm_weights"]) - mlm_weight}
        loss = mlm_loss / jnp.maximum(mlm_weight, 1.0)
        if self.config.task.nsp:
            nsp_loss, nsp_correct, nsp_weight = base.cross_entropy(out["nsp_logits"], batch["nsp_label"])
            sums.update(nsp_loss=nsp_loss, nsp_correct=nsp_correct, nsp_weight=nsp_weight)
            loss = loss + nsp_loss / nsp_weight
        return loss, {"loss": loss, "weight": jnp.ones((), jnp.float32), **sums}

    @staticmethod
    def summarize(sums: dict) -> dict:
        metrics = {"loss": sums["loss"] / jnp.maximum(sums["weight"], 1.0),
                   "dropped_predictions": sums["dropped_predictions"]}
        for head in ("mlm_", "nsp_"):
            if f"{head}weight" in sums:
                metrics.update(base.mean_metrics(sums, prefix=head))
        return metrics

    def documents(self, split: str):
        """The split's documents (blank-line separated) of sentences (lines), tokenized."""
        if split not in self._documents:
            d = self.config.data
            source = builders.get_source(d.name, split, data_dir=d.data_dir, files=d.files,
                                         text_key=d.text_key)
            texts = ["".join(source.iter_texts())] if source.one_document else source.iter_texts()
            documents = [doc for text in texts for doc in mlm.documents_from_text(text)]
            self._documents[split] = mlm.encode_documents(documents, self.tokenizer)
        return self._documents[split]

    def data_kwargs(self, split: str) -> dict:
        c = self.config
        return dict(seq_len=c.data.seq_len, global_batch_size=c.train.batch_size, seed=c.seed,
                    specials=self.specials, vocab_size=self.tokenizer.vocab_size,
                    probability=c.task.mlm_probability, whole_word=c.task.whole_word_masking,
                    word_starts_fn=self.tokenizer.word_starts, nsp=c.task.nsp,
                    what=f"Split {split!r} of {c.data.name}", **self.process_kwargs())

    def train_iterator(self):
        split = self.config.data.train_split
        return mlm.mlm_nsp_train_iterator(self.documents(split), **self.data_kwargs(split))

    def eval_batches(self, split: str, max_batches: int):
        return mlm.mlm_nsp_eval_batches(self.documents(split), max_batches=max_batches,
                                        **self.data_kwargs(split))
