"""Encoder-decoder objectives (T5): span corruption pretraining and seq2seq (translation).

Both train the decoder with teacher forcing on the batches of `jaxlm.data.seq2seq`
(encoder_input_tokens, decoder_input_tokens, decoder_target_tokens, decoder_loss_weights,
example_weight); pad id 0 is padding and the decoder's start token, as in T5.
"""

import os

import jax.numpy as jnp
import numpy as np

from jaxlm.data import builders, pipeline, seq2seq, tokenizers
from jaxlm.infer import seq2seq as decoding
from jaxlm.tasks import base

PAD = 0


class EncoderDecoder(base.Task):
    """What span corruption and seq2seq share: the model, the loss, the tokenizer."""

    def __init__(self, config, tokenizer):
        super().__init__(config, tokenizer)
        if config.model.name != "t5":
            raise ValueError(f"task {config.task.name} needs model.name='t5', not {config.model.name!r}")
        if tokenizer.pad_id != PAD or tokenizer.eos_id is None:
            raise ValueError(f"task {config.task.name} needs a tokenizer with pad id 0 and an EOS id "
                             "(a sentencepiece model from tools/train_tokenizer.py, or none: one is "
                             "trained on the train split)")
        self.eos_id = tokenizer.eos_id

    @classmethod
    def build_tokenizer(cls, config, workdir: str):
        """A sentencepiece model trained on the train split when `data.tokenizer_path` is empty."""
        d = config.data
        directory = os.path.join(workdir, pipeline.TOKENIZER_DIR)
        if d.tokenizer == "sentencepiece" and not d.tokenizer_path and not tokenizers.exists(directory):
            # Trained straight into the workdir's tokenizer folder, where saving it finds it.
            model = tokenizers.train_sentencepiece(
                cls.tokenizer_texts(config), vocab_size=d.tokenizer_vocab_size,
                path=os.path.join(directory, tokenizers.SENTENCEPIECE_FILE))
            return pipeline.build_tokenizer("sentencepiece", workdir=workdir, name=d.name, model_path=model)
        return super().build_tokenizer(config, workdir)

    def dummy_batch(self):
        return {"encoder_input_tokens": jnp.zeros((1, self.config.data.seq_len), jnp.int32),
                "decoder_input_tokens": jnp.zeros((1, self.target_len), jnp.int32)}

    def model_inputs(self, batch):
        return {"encoder_tokens": batch["encoder_input_tokens"],
                "decoder_tokens": batch["decoder_input_tokens"]}

    def loss(self, params, batch, rng=None, train: bool = False):
        logits = self.model.apply({"params": params}, **self.model_inputs(batch),
                                  deterministic=not train, rngs=self.rngs(rng, train))
        loss, correct, weight = base.cross_entropy(logits, batch["decoder_target_tokens"],
                                                   batch["decoder_loss_weights"])
        return loss, {"loss": loss, "correct": correct, "weight": weight}

    @staticmethod
    def summarize(sums: dict) -> dict:
        metrics = base.mean_metrics(sums)
        return {**metrics, "perplexity": jnp.exp(metrics["loss"])}

    def check_lengths(self):
        m = self.config.model
        if self.target_len > m.max_len:
            raise ValueError(f"targets of {self.target_len} tokens exceed model.max_len={m.max_len} "
                             "(the decoder's cache length)")


class SpanCorruption(EncoderDecoder):
    """T5 pretraining: corrupt 15% of a window in spans, predict the spans after sentinels."""

    def __init__(self, config, tokenizer):
        super().__init__(config, tokenizer)
        t = config.task
        self.set_vocab_size(tokenizer.vocab_size + t.extra_ids)
        self.tokens_length, self.target_len = seq2seq.span_corruption_lengths(
            config.data.seq_len, t.noise_density, t.mean_noise_span_length)
        self.check_lengths()
        self.model = self.build_model()
        self.tokens_per_example = config.data.seq_len + self.target_len

    @classmethod
    def tokenizer_texts(cls, config):
        d = config.data
        source = builders.get_source(d.name, d.train_split, data_dir=d.data_dir, files=d.files,
                                     text_key=d.text_key)
        for text in source.iter_texts():  # sentencepiece skips sentences over a few KB: give lines
            yield from text.splitlines()

    def data_kwargs(self, split: str) -> dict:
        c, d = self.config, self.config.data
        tokens = pipeline.token_stream(name=d.name, split=split, tokenizer=self.tokenizer,
                                       data_dir=d.data_dir, files=d.files, text_key=d.text_key)
        return dict(inputs_length=d.seq_len, global_batch_size=c.train.batch_size, seed=c.seed,
                    vocab_size=c.model.vocab_size, eos_id=self.eos_id, noise_density=c.task.noise_density,
                    mean_noise_span_length=c.task.mean_noise_span_length, **self.process_kwargs()), tokens

    def train_iterator(self):
        kwargs, tokens = self.data_kwargs(self.config.data.train_split)
        return seq2seq.span_corruption_train_iterator(tokens=tokens, **kwargs)

    def eval_batches(self, split: str, max_batches: int):
        kwargs, tokens = self.data_kwargs(split)
        return seq2seq.span_corruption_eval_batches(tokens, max_batches=max_batches, **kwargs)


class Seq2Seq(EncoderDecoder):
    """Translation (or any text-to-text pairs): source -> encoder, target -> decoder.

    Evaluation adds `bleu` (sacrebleu, on detokenized text) of beam-search translations.
    """

    def __init__(self, config, tokenizer):
        super().__init__(config, tokenizer)
        self.set_vocab_size(tokenizer.vocab_size)
        self.target_len = config.data.target_len or config.data.seq_len
        self.check_lengths()
        self.model = self.build_model()
        self.tokens_per_example = config.data.seq_len + self.target_len

    @classmethod
    def pairs(cls, config, split: str):
        d = config.data
        return builders.get_pairs(d.name, split, source_key=d.source_key, target_key=d.target_key,
                                  data_dir=d.data_dir, files=d.files)

    @classmethod
    def tokenizer_texts(cls, config):
        for source, target in cls.pairs(config, config.data.train_split).iter_pairs():
            yield source
            yield target

    def data_kwargs(self, split: str) -> dict:
        c = self.config
        return dict(pairs=self.pairs(c, split), tokenizer=self.tokenizer, source_len=c.data.seq_len,
                    target_len=self.target_len, global_batch_size=c.train.batch_size, eos_id=self.eos_id,
                    source_prefix=c.task.source_prefix, **self.process_kwargs())

    def train_iterator(self):
        return seq2seq.pairs_train_iterator(seed=self.config.seed, **self.data_kwargs(self.config.data.train_split))

    def eval_batches(self, split: str, max_batches: int):
        return seq2seq.pairs_eval_batches(max_batches=max_batches, **self.data_kwargs(split))

    def translate(self, params, encoder_tokens: np.ndarray) -> list[str]:
        tokens = decoding.decode(self.model, params, encoder_tokens, max_len=self.target_len,
                                 eos_id=self.eos_id, beam_size=self.config.task.beam_size,
                                 vocab_size=self.tokenizer.vocab_size)
        return [self.tokenizer.decode(row[: np.argmax(row == self.eos_id) if (row == self.eos_id).any()
                                          else len(row)]) for row in np.asarray(tokens)]

    def generation_metrics(self, params, split: str) -> dict:
        import sacrebleu  # pylint: disable=import-outside-toplevel

        pairs = self.pairs(self.config, split)
        batches = self.eval_batches(split, self.config.task.eval_bleu_batches)
        hypotheses = []
        for batch in batches:
            real = batch["example_weight"] > 0
            hypotheses += self.translate(params, batch["encoder_input_tokens"][real])
        references = [pairs[i][1] for i in range(len(hypotheses))]
        return {"bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score}

    def sample(self, params) -> str | None:
        pairs = self.pairs(self.config, self.config.data.eval_split)
        batch = self.eval_batches(self.config.data.eval_split, 1)[0]
        lines = []
        for i, hypothesis in enumerate(self.translate(params, batch["encoder_input_tokens"][:3])):
            lines += [f"source:     {pairs[i][0]}", f"reference:  {pairs[i][1]}", f"prediction: {hypothesis}"]
        return "\n".join(lines)
