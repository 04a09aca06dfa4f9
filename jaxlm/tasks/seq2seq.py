"""Encoder-decoder objectives (T5): span corruption pretraining and seq2seq (translation).

Both train the decoder with teacher forcing on the batches of `jaxlm.data.encoder_decoder`
(encoder_input_tokens, decoder_input_tokens, decoder_target_tokens, decoder_loss_weights,
example_weight); pad id 0 is padding and the decoder's start token, as in T5.
"""

import os

import jax.numpy as jnp
import numpy as np

from jaxlm.data import builders, lm, progress, readers, span_corruption, text_pairs, tokenizers
from jaxlm.infer import seq2seq_decoding as decoding
from jaxlm.tasks import base

PAD = 0
LENGTH_KEYS = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights")


class EncoderDecoder(base.Task):
    """What span corruption and seq2seq share: the model, the loss, the tokenizer."""

    families = ("t5",)

    def __init__(self, config, tokenizer):
        super().__init__(config, tokenizer)
        if tokenizer.pad_id != PAD or tokenizer.eos_id is None:
            raise ValueError(f"task {config.task.name} needs a tokenizer with pad id 0 and an EOS id "
                             "(a sentencepiece model from tools/train_tokenizer.py, or none: one is "
                             "trained on the train split)")
        self.eos_id = tokenizer.eos_id

    @classmethod
    def build_tokenizer(cls, config, workdir: str):
        """A sentencepiece model trained on the train split when `data.tokenizer_path` is empty."""
        d = config.data
        directory = os.path.join(workdir, tokenizers.TOKENIZER_DIR)
        if d.tokenizer == "sentencepiece" and not d.tokenizer_path and not tokenizers.exists(directory):
            # Trained straight into the workdir's tokenizer folder, where saving it finds it.
            model = tokenizers.train_sentencepiece(
                cls.tokenizer_texts(config), vocab_size=d.tokenizer_vocab_size,
                path=os.path.join(directory, tokenizers.SENTENCEPIECE_FILE))
            return tokenizers.build_tokenizer("sentencepiece", workdir=workdir, name=d.name, model_path=model)
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
        loss, correct, weight = base.cross_entropy(
            logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"],
            label_smoothing=self.config.task.label_smoothing if train else 0.0)
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
        self.tokens_length, self.target_len = span_corruption.span_corruption_lengths(
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
        tokens = lm.token_stream(name=d.name, split=split, tokenizer=self.tokenizer,
                                 data_dir=d.data_dir, files=d.files, text_key=d.text_key)
        return dict(inputs_length=d.seq_len, global_batch_size=c.train.batch_size, seed=c.seed,
                    vocab_size=c.model.vocab_size, eos_id=self.eos_id, noise_density=c.task.noise_density,
                    mean_noise_span_length=c.task.mean_noise_span_length,
                    what=f"Split {split!r} of {d.name}", **self.process_kwargs()), tokens

    def train_iterator(self):
        kwargs, tokens = self.data_kwargs(self.config.data.train_split)
        return span_corruption.span_corruption_train_iterator(tokens=tokens, **kwargs)

    def eval_batches(self, split: str, max_batches: int):
        kwargs, tokens = self.data_kwargs(split)
        return span_corruption.span_corruption_eval_batches(tokens, max_batches=max_batches, **kwargs)


class Seq2Seq(EncoderDecoder, base.Predicts):
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

    def split_pairs(self, split: str, data_path: str = ""):
        """A split's (source, target) pairs, or those of two line-aligned files 'SOURCE,TARGET'."""
        if not data_path:
            return self.pairs(self.config, split)
        files = data_path.split(",")
        if len(files) != 2:
            raise ValueError(f"data_path={data_path!r}: a seq2seq task reads two line-aligned files, "
                             "given as 'SOURCE_FILE,TARGET_FILE'")
        return readers.read_aligned(*files)

    def data_kwargs(self, split: str, data_path: str = "") -> dict:
        c = self.config
        return dict(pairs=self.split_pairs(split, data_path), tokenizer=self.tokenizer, source_len=c.data.seq_len,
                    target_len=self.target_len, global_batch_size=c.train.batch_size, eos_id=self.eos_id,
                    source_prefix=c.task.source_prefix, **self.process_kwargs())

    def train_iterator(self):
        return text_pairs.pairs_train_iterator(seed=self.config.seed, bucket_batches=self.config.data.bucket_batches,
                                               **self.data_kwargs(self.config.data.train_split))

    def fit_length(self, batches):
        """Cuts the stacked batches' source and target axes to the longest row of either side,
        rounded up to `data.pad_multiple` (one length for both: fewer compiled shapes). With
        `data.bucket_batches` the rows of a batch have similar lengths, so it is a short step.
        Several processes would each cut their own rows differently: they keep full lengths."""
        longest = max(int((batches[key] > 0).sum(-1).max()) for key in ("encoder_input_tokens", "decoder_loss_weights"))
        return base.cut_to_longest(self.config, batches, longest, LENGTH_KEYS)

    def tokens_in(self, batches):
        return batches["encoder_input_tokens"].shape[-1] + batches["decoder_input_tokens"].shape[-1]

    def eval_batches(self, split: str, max_batches: int, data_path: str = ""):
        return text_pairs.pairs_eval_batches(max_batches=max_batches, **self.data_kwargs(split, data_path))

    def translate(self, params, encoder_tokens: np.ndarray) -> list[str]:
        tokens = decoding.decode(self.model, params, encoder_tokens, max_len=self.target_len,
                                 eos_id=self.eos_id, beam_size=self.config.task.beam_size,
                                 vocab_size=self.tokenizer.vocab_size)
        return [self.tokenizer.decode(row[: np.argmax(row == self.eos_id) if (row == self.eos_id).any()
                                          else len(row)]) for row in np.asarray(tokens)]

    def predictions(self, params, split: str, data_path: str = "", max_batches: int = 0):
        """({'bleu'}, a row per pair: source, reference, prediction) by beam search."""
        import sacrebleu  # pylint: disable=import-outside-toplevel

        pairs = self.split_pairs(split, data_path)
        rows = []
        batches = self.eval_batches(split, max_batches, data_path)
        for batch in progress.progress(batches, desc=f"beam search ({split or data_path})", total=len(batches)):
            real = batch["example_weight"] > 0
            for hypothesis in self.translate(params, batch["encoder_input_tokens"][real]):
                source, reference = pairs[len(rows)]
                rows.append({"index": len(rows), "source": source, "reference": reference,
                             "prediction": hypothesis})
        bleu = sacrebleu.corpus_bleu([r["prediction"] for r in rows], [[r["reference"] for r in rows]])
        return {"bleu": bleu.score}, rows

    def generation_metrics(self, params, split: str) -> dict:
        return self.predictions(params, split, max_batches=self.config.task.eval_bleu_batches)[0]

    def text_batch(self, text: str, target: str = "") -> dict:
        """A batch of the one pair (text, target), encoded as the eval split's pairs are."""
        return text_pairs.pairs_eval_batches(max_batches=1, **{**self.data_kwargs(self.config.data.eval_split),
                                                               "pairs": [(text, target)], "global_batch_size": 1,
                                                               "process_index": 0, "process_count": 1})[0]

    def predict_text(self, params, text: str) -> dict:
        batch = self.text_batch(text)
        return {"source": text, "translation": self.translate(params, batch["encoder_input_tokens"])[0]}

    def sample(self, params) -> str | None:
        _, rows = self.predictions(params, self.config.data.eval_split, max_batches=1)
        return "\n".join(f"source:     {r['source']}\nreference:  {r['reference']}\nprediction: {r['prediction']}"
                         for r in rows[:3])
