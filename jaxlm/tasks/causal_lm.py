"""Causal language modelling: predict token t+1 from tokens <= t."""

import os

import jax.numpy as jnp

from jaxlm.data import batching, lm, prepared, tokenizers
from jaxlm.infer import sampling
from jaxlm.tasks import base


class CausalLM(base.Task):
    """Batches are `{'inputs': int32[b, l], 'targets': int32[b, l]}` (+ optional float `weights`)."""

    def __init__(self, config, tokenizer):
        super().__init__(config, tokenizer)
        if config.data.seq_len > config.model.max_len:
            raise ValueError(f"data.seq_len={config.data.seq_len} exceeds model.max_len={config.model.max_len}")
        self.set_vocab_size(tokenizer.vocab_size)
        self.model = self.build_model()
        self.tokens_per_example = config.data.seq_len

    @classmethod
    def build_tokenizer(cls, config, workdir: str):
        """With `data.prepared`, the corpus's tokenizer (saved into the workdir on the first start);
        otherwise the base class's."""
        d = config.data
        if not d.prepared:
            return super().build_tokenizer(config, workdir)
        directory = os.path.join(workdir, tokenizers.TOKENIZER_DIR)
        saved = tokenizers.exists(directory)
        tokenizer = tokenizers.load(directory if saved else os.path.join(d.prepared, tokenizers.TOKENIZER_DIR))
        if tokenizer.kind != d.tokenizer:
            raise ValueError(f"data.prepared={d.prepared!r} was tokenized with a {tokenizer.kind!r} tokenizer but "
                             f"data.tokenizer={d.tokenizer!r}; set data.tokenizer={tokenizer.kind!r}.")
        if not saved:
            tokenizer.save(directory)
        return tokenizer

    def corpus(self, split: str) -> prepared.Corpus:
        """The prepared split (`data.prepared`), checked against the run's tokenizer and seq_len."""
        corpus = prepared.Corpus(self.config.data.prepared, split)
        prepared.check_tokenizer(corpus, self.tokenizer)
        prepared.check_seq_len(corpus, self.config.data.seq_len)
        return corpus

    def dummy_batch(self):
        return {"inputs": jnp.zeros((1, self.config.data.seq_len), jnp.int32)}

    def model_inputs(self, batch):
        return {"tokens": batch["inputs"]}

    def loss(self, params, batch, rng=None, train: bool = False):
        """Returns (summed loss, {'loss': sum, 'correct': sum, 'weight': sum})."""
        logits = self.model.apply({"params": params}, **self.model_inputs(batch),
                                  deterministic=not train, rngs=self.rngs(rng, train))
        loss, correct, weight = base.cross_entropy(logits, batch["targets"], batch.get("weights"))
        return loss, {"loss": loss, "correct": correct, "weight": weight}

    @staticmethod
    def summarize(sums: dict) -> dict:
        metrics = base.mean_metrics(sums)
        return {**metrics, "perplexity": jnp.exp(metrics["loss"])}

    def data_kwargs(self, split: str) -> dict:
        d = self.config.data
        return dict(name=d.name, split=split, tokenizer=self.tokenizer, seq_len=d.seq_len,
                    data_dir=d.data_dir, files=d.files, text_key=d.text_key, **self.process_kwargs())

    def train_iterator(self):
        c = self.config
        if c.data.prepared:
            ds = prepared.train_dataset(self.corpus(c.data.train_split), global_batch_size=c.train.batch_size,
                                        seed=c.seed, **self.process_kwargs())
            return batching.iterate(ds)
        return lm.train_iterator(global_batch_size=c.train.batch_size, seed=c.seed,
                                 **self.data_kwargs(c.data.train_split))

    def eval_batches(self, split: str, max_batches: int):
        if self.config.data.prepared:
            return prepared.eval_batches(self.corpus(split), global_batch_size=self.config.train.batch_size,
                                         max_batches=max_batches, **self.process_kwargs())
        return lm.eval_batches(global_batch_size=self.config.train.batch_size,
                               max_batches=max_batches, **self.data_kwargs(split))

    def sample(self, params) -> str | None:
        return sampling.sample_text(self.model, params, self.tokenizer, self.config.sample,
                                    seed=self.config.seed)
