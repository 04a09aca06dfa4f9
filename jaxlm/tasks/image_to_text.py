"""Image-to-text: captioning (`task.name='captioning'`) and visual question answering
(`task.name='vqa'`) with a ViT encoder and a T5 decoder (`jaxlm.models.image_to_text`).

Data (`jaxlm.data.image_text`): Fashion-MNIST / MNIST images with descriptions of their class, or
questions about it, or your own folder of images with captions.jsonl / captions.tsv (captioning)
or questions.jsonl (VQA). The decoder is trained with teacher forcing on the caption, or on the
question followed by the answer with the loss on the answer only (the question is the answer's
prompt, as GIT does it), and the image's every patch is the memory it cross-attends to.

Evaluation adds, on images never trained on (the eval split), by beam search:
  captioning   `bleu` (sacrebleu against all the image's captions), `cider` (CIDEr-D, x10) and,
               on class-description data, `caption_class_accuracy`: the share of captions that
               name the image's class (by the longest class description they contain);
  vqa          `answer_accuracy`: answers equal to the reference, word for word.
`jaxlm.predict --text=IMAGE_FILE` captions an image file; `--text='IMAGE_FILE|QUESTION'` answers.
The ViT may start from a jaxlm ViT run (`task.image_init_from`, its head dropped).
"""

import os

import flax
import numpy as np

from jaxlm import peft
from jaxlm.compress import quantize
from jaxlm.data import image_text, progress
from jaxlm.infer import seq2seq_decoding as decoding
from jaxlm.models import image_to_text, pipeline_parallel
from jaxlm.tasks import base, caption_metrics, seq2seq
from jaxlm.tasks.image_text import IMAGE, RUN_KEYS, ImagePairs, tower_config

MODES = ("captioning", "vqa")
DECODER_KEYS = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights", "prompt_tokens")


class ImageToText(ImagePairs, seq2seq.EncoderDecoder, base.Predicts):
    """Captioning or VQA (see the module docstring)."""

    heads = (r"^image_projection(/|$)",)

    def __init__(self, config, tokenizer):
        t, d = config.task, config.data
        self.questions = t.name == "vqa"
        self.sources = {}
        if t.image_init_from:
            self.sources[IMAGE] = tower_config(config, t.image_init_from, "vit", "task.image_init_from")
            config.image_model.update({k: v for k, v in self.sources[IMAGE].model.to_dict().items()
                                       if k not in RUN_KEYS})
        super().__init__(config, tokenizer)
        self.train_pairs = self.pairs(d.train_split)
        height, width, channels = self.train_pairs.images.shape[1:]
        image = config.image_model
        image.image_size = image.image_size or height
        if height != width or image.image_size != height:
            raise ValueError(f"the ViT takes square images of image_model.image_size={image.image_size}; "
                             f"{d.name} has {height}x{width}")
        image.num_classes = 0
        self.image_shape = (height, width, channels)
        self.positions = image_to_text.positions(image)
        self.set_vocab_size(tokenizer.vocab_size)
        self.target_len = d.target_len or d.seq_len
        self.check_lengths()
        self.tokens_per_example = self.positions + self.target_len
        model = image_to_text.from_config(config.model, image, pipeline_parallel.from_config(config))
        self.model = peft.attach(quantize.attach(model, quantize.from_config(config.model)), self.peft)

    @classmethod
    def tokenizer_texts(cls, config):
        """Every distinct caption (or question and answer) of the train split."""
        d = config.data
        pairs = image_text.load(d.name, d.train_split, data_dir=d.data_dir, files=d.files,
                                image_size=config.image_model.image_size, channels=d.image_channels,
                                questions=config.task.name == "vqa")
        texts = {}
        for options in pairs.captions:
            for text in options:
                texts.update(dict.fromkeys((text,) if isinstance(text, str) else text))
        return iter(texts)

    # The model.

    def parameter_sources(self) -> tuple:
        return tuple(base.ParameterSource(IMAGE, self.config.task.image_init_from, source)
                     for source in self.sources.values())

    def pretrained(self, sources: dict) -> dict:
        """The encoder from a ViT run, without its head."""
        if IMAGE not in sources:
            return {}
        params = dict(flax.core.unfreeze(sources[IMAGE]))
        params.pop("head", None)
        return {IMAGE: params}

    def dummy_batch(self):
        return {"image": np.zeros((1, *self.image_shape), np.float32),
                "decoder_input_tokens": np.zeros((1, self.target_len), np.int32)}

    def model_inputs(self, batch):
        return {"images": batch["image"], "decoder_tokens": batch["decoder_input_tokens"]}

    # Data.

    def pairs(self, split: str) -> image_text.Pairs:
        d = self.config.data
        return image_text.load(d.name, split, data_dir=d.data_dir, files=d.files,
                               image_size=self.config.image_model.image_size, channels=d.image_channels,
                               questions=self.questions)

    def encode_text(self, text) -> dict:
        """The decoder's arrays of a caption, or of a (question, answer) pair: the question is
        `prompt_tokens` and carries no loss. Tokens past `target_len` are cut."""
        question, answer = ("", text) if isinstance(text, str) else text
        prompt = self.tokenizer.encode(question).tolist() if question else []
        if len(prompt) >= self.target_len:
            raise ValueError(f"the question {question!r} takes {len(prompt)} tokens: no room for an answer in "
                             f"data.target_len={self.target_len}")
        sequence = (prompt + self.tokenizer.encode(answer).tolist() + [self.eos_id])[: self.target_len]
        row = {key: np.zeros(self.target_len, dtype) for key, dtype in zip(DECODER_KEYS, (np.int32, np.int32, np.float32, np.int32))}
        row["decoder_target_tokens"][: len(sequence)] = sequence
        row["decoder_input_tokens"][1: len(sequence)] = sequence[:-1]
        row["decoder_loss_weights"][len(prompt): len(sequence)] = 1.0
        row["prompt_tokens"][: len(prompt)] = prompt
        return row

    def prompts(self, questions) -> np.ndarray:
        """int32 [len(questions), target_len]: each question as the decoder's forced prompt."""
        return np.stack([self.encode_text((question, ""))["prompt_tokens"] for question in questions])

    def fit_length(self, batches):
        return base.cut_to_longest(self.config, batches, int((batches["decoder_target_tokens"] > 0).sum(-1).max()),
                                   DECODER_KEYS)

    # Generation.

    def describe(self, params, pixels: np.ndarray, prompts: np.ndarray | None = None) -> list[str]:
        """The decoded text (after each row's prompt) of images float32 [n, H, W, C]."""
        n = len(pixels)
        if prompts is not None:  # padded to target_len: cut to the longest question
            prompts = np.asarray(prompts)[:, : int((np.asarray(prompts) > 0).sum(-1).max())]
        tokens = decoding.decode(self.model, params, pixels, encoder_mask=np.ones((n, self.positions), bool),
                                 prompt=prompts, max_len=self.target_len, eos_id=self.eos_id,
                                 beam_size=self.config.task.beam_size, vocab_size=self.tokenizer.vocab_size)
        starts = np.zeros(n, int) if prompts is None else (np.asarray(prompts) > 0).sum(-1)
        texts = []
        for row, start in zip(np.asarray(tokens), starts):
            row = row[start:]
            end = np.argmax(row == self.eos_id) if (row == self.eos_id).any() else len(row)
            texts.append(self.tokenizer.decode(row[:end]))
        return texts

    def predictions(self, params, split: str, data_path: str = "", max_batches: int = 0):
        """(metrics, a row per image: its question, prediction and references) by beam search;
        `data_path` is a folder of the data's own format (captions or questions)."""
        if data_path:
            d = self.config.data
            pairs = image_text.read_folder(data_path, image_size=self.config.image_model.image_size,
                                           channels=d.image_channels, questions=self.questions)
        else:
            pairs = self.split_pairs(split)
        batches = image_text.eval_batches(pairs, self.encode_text, global_batch_size=self.config.train.batch_size,
                                          max_batches=max_batches, **self.process_kwargs())
        rows = []
        for batch in progress.progress(batches, desc=f"beam search ({split or data_path})", total=len(batches)):
            real = batch["index"] >= 0
            prompts = batch["prompt_tokens"][real] if self.questions else None
            for i, text in zip(batch["index"][real], self.describe(params, batch["image"][real], prompts)):
                shown = image_text.eval_caption(pairs, int(i))
                row = {"index": int(i), "label": int(pairs.labels[i]), "prediction": text}
                if self.questions:
                    row.update(question=shown[0], answer=shown[1])
                else:
                    row.update(reference=shown, references=pairs.captions[i])
                rows.append(row)
        return self.scores(rows), rows

    def scores(self, rows: list[dict]) -> dict:
        if self.questions:
            right = [caption_metrics.exact_match(r["prediction"], r["answer"]) for r in rows]
            return {"answer_accuracy": float(np.mean(right))}
        import sacrebleu  # pylint: disable=import-outside-toplevel

        predictions = [r["prediction"] for r in rows]
        references = [r["references"] for r in rows]
        most = max(len(refs) for refs in references)  # sacrebleu takes streams of equal length
        streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(most)]
        metrics = {"bleu": sacrebleu.corpus_bleu(predictions, streams).score,
                   "cider": caption_metrics.cider_d(predictions, references)}
        name = self.config.data.name
        if name in image_text.DESCRIPTIONS:
            named = [named_class(name, r["prediction"]) == r["label"] for r in rows]
            metrics["caption_class_accuracy"] = float(np.mean(named))
        return metrics

    def generation_metrics(self, params, split: str) -> dict:
        return self.predictions(params, split, max_batches=self.config.task.eval_bleu_batches)[0]

    def predict_text(self, params, text: str) -> dict:
        """'IMAGE_FILE' -> its caption; 'IMAGE_FILE|QUESTION' -> the answer."""
        path, _, question = (part.strip() for part in text.partition("|"))
        if self.questions != bool(question.strip()):
            raise ValueError(f"task {self.config.task.name}: expected "
                             f"{'IMAGE_FILE|QUESTION' if self.questions else 'IMAGE_FILE'}, got {text!r}")
        pixels = image_text.read_image(os.path.dirname(path) or ".", os.path.basename(path), self.image_shape[0],
                                       self.image_shape[2])
        prompts = self.prompts([question]) if self.questions else None
        answer = self.describe(params, pixels[None].astype(np.float32) / 255.0, prompts)[0]
        return {"image": path, "question": question, "answer": answer} if self.questions else \
            {"image": path, "caption": answer}

    def sample(self, params) -> str | None:
        _, rows = self.predictions(params, self.config.data.eval_split, max_batches=1)
        if self.questions:
            return "\n".join(f"image {r['index']}: {r['question']} -> {r['prediction']} (answer: {r['answer']})"
                             for r in rows[:3])
        return "\n".join(f"image {r['index']}: {r['prediction']} (reference: {r['reference']})" for r in rows[:3])


def named_class(name: str, caption: str) -> int:
    """The class whose description the caption holds (the longest one found), or -1."""
    text = " ".join(caption_metrics.words(caption))
    found = [(len(d), y) for y, options in enumerate(image_text.DESCRIPTIONS[name]) for d in options
             if f" {' '.join(caption_metrics.words(d))} " in f" {text} "]
    return max(found)[1] if found else -1

