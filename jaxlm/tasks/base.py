"""What every task offers the trainer; the trainer knows nothing else about objectives.

A task owns the batch layout, its data pipeline, how to run the model on a batch, the loss and
the metrics. Losses are returned as sums with their weight so that gradient accumulation and
multi-device reduction stay exact.

`Task` is the interface: six abstract methods every task implements, a few methods with
defaults a task may override, and declared optional capabilities: `Predicts` (a task inherits
it to write per-example predictions and to predict for raw text) and `parameter_sources` (other
parameters it needs, e.g. a distillation teacher, which the trainer loads and hands back).
"""

import abc
import copy
import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxlm import config as config_lib
from jaxlm import convert, models, peft
from jaxlm.compress import quantize
from jaxlm.data import tokenizers
from jaxlm.models import pipeline_parallel


def cross_entropy(logits, targets, weights=None, label_smoothing: float = 0.0):
    """Summed softmax cross-entropy (float32), correct predictions and weight over positions.

    With `label_smoothing` e the target distribution is (1 - e) on the label and e spread evenly
    over the vocabulary (Szegedy et al. 2016): the loss is (1 - e) * nll + e * mean(-log p)."""
    if weights is None:
        weights = jnp.ones(targets.shape, jnp.float32)
    logits = logits.astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    if label_smoothing:
        uniform = -jnp.mean(jax.nn.log_softmax(logits), axis=-1)
        losses = (1.0 - label_smoothing) * losses + label_smoothing * uniform
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return jnp.sum(losses * weights), jnp.sum(correct * weights), jnp.sum(weights)


def cut_to_longest(config, batches: dict, longest: int, keys) -> dict:
    """Dynamic padding, as every task with padded sequences does it: the `keys` of stacked train
    batches cut to `longest` rounded up to `data.pad_multiple` (a handful of compiled lengths;
    0: no cut). Several processes would each cut their own rows differently: they keep full
    lengths."""
    multiple = config.data.pad_multiple
    if multiple <= 0 or jax.process_count() > 1:
        return batches
    length = -(-longest // multiple) * multiple
    return {k: v[..., :length] if k in keys else v for k, v in batches.items()}


def mean_metrics(sums: dict, prefix: str = "") -> dict:
    """Mean `{prefix}loss` and `{prefix}accuracy` from summed loss, correct and weight."""
    weight = jnp.maximum(sums[f"{prefix}weight"], 1.0)
    return {f"{prefix}loss": sums[f"{prefix}loss"] / weight,
            f"{prefix}accuracy": sums[f"{prefix}correct"] / weight}


# data.tokenizer kinds a Hugging Face folder ships, and the file each is read from.
HF_TOKENIZER_FILES = {"wordpiece": "vocab.txt", "huggingface": "tokenizer.json"}


def hf_tokenizer_file(kind: str, name: str) -> str:
    """The tokenizer file of `kind` in a Hugging Face model folder or an installed package
    shipping one (`name`)."""
    file = HF_TOKENIZER_FILES[kind]
    hf_dir = convert.resolve(name) if name else None
    if hf_dir is None or not os.path.isfile(os.path.join(hf_dir, file)):
        raise FileNotFoundError(f"data.tokenizer={kind!r} needs data.tokenizer_path: a {file}, "
                                f"or a Hugging Face folder or package holding one (got {name!r})")
    return os.path.join(hf_dir, file)


def is_workdir(source: str) -> bool:
    return os.path.isfile(os.path.join(source, "config.json")) and os.path.isdir(os.path.join(source, "checkpoints"))


def source_config(config, source: str, what: str):
    """The config of a `ParameterSource` at `source`: a jaxlm workdir's own, or `config` with the
    Hugging Face checkpoint's architecture (and `init_from` it, all parameters); on `config`'s
    mesh either way. `what` is the setting that named `source` (for errors)."""
    if is_workdir(source):
        loaded = config_lib.load(source)
    else:
        hf_dir = convert.resolve(source)
        if hf_dir is None:
            raise ValueError(f"{what}={source!r} is neither a jaxlm workdir (config.json and checkpoints/) "
                             "nor a Hugging Face folder or package")
        loaded = copy.deepcopy(config)
        loaded.model.update(convert.model_overrides(hf_dir))
        loaded.init_from, loaded.peft.method = hf_dir, "full"
    loaded.mesh.update(config.mesh.to_dict())
    return loaded


@dataclasses.dataclass(frozen=True)
class ParameterSource:
    """Parameters a task needs besides `init_from`'s, loaded by the trainer on every start.

    name: the key the task gets them under (`Task.pretrained`).
    path: a jaxlm workdir (its latest checkpoint) or a Hugging Face folder or package.
    config: the source's config (its model's architecture), on this run's mesh.
    """

    name: str
    path: str
    config: Any


class Task(abc.ABC):
    """Base class: `config` is the run's config, `tokenizer` the run's tokenizer (or None).

    Subclasses set `self.model` (usually `self.build_model()` after fixing the vocabulary)
    and implement the abstract methods. `trainable(name)` says which parameters train (see
    `jaxlm.peft`).
    """

    tokens_per_example = 0  # for tokens/s and MFU; 0 when the examples are not token sequences
    heads = ()  # regexes of the task's own new layers: they train under every PEFT method
    families = ()  # the model families (`model.name`) the task runs on; () for any

    def __init__(self, config, tokenizer):
        if self.families and config.model.name not in self.families:
            wanted = " or ".join(repr(f) for f in self.families)
            raise ValueError(f"task {config.task.name} needs model.name={wanted}, not {config.model.name!r}")
        self.config = config
        self.tokenizer = tokenizer
        self.peft = peft.from_config(config)
        self.trainable = peft.trainable_fn(config, self.heads)

    # Required.

    @abc.abstractmethod
    def dummy_batch(self) -> dict:
        """A batch of one row with the shapes and dtypes of the real ones (for init)."""

    @abc.abstractmethod
    def model_inputs(self, batch: dict) -> dict:
        """The model's keyword arguments for `batch`."""

    @abc.abstractmethod
    def loss(self, params, batch: dict, rng=None, train: bool = False):
        """(summed loss, metric sums including `loss` and `weight`)."""

    @abc.abstractmethod
    def summarize(self, sums: dict) -> dict:
        """Metrics (means) from metric sums added over batches."""

    @abc.abstractmethod
    def train_iterator(self):
        """This process's train batches, endless, with a checkpointable position."""

    @abc.abstractmethod
    def eval_batches(self, split: str, max_batches: int):
        """This process's batches of `split` (all of them when `max_batches` is 0)."""

    # Optional, with defaults.

    @classmethod
    def build_tokenizer(cls, config, workdir: str):
        """The run's tokenizer, saved in (or loaded from) `workdir/tokenizer`."""
        d = config.data
        model_path = d.tokenizer_path
        saved = tokenizers.exists(os.path.join(workdir, tokenizers.TOKENIZER_DIR))
        if d.tokenizer in HF_TOKENIZER_FILES and not os.path.isfile(model_path) and not saved:
            model_path = hf_tokenizer_file(d.tokenizer, model_path or config.init_from)
        return tokenizers.build_tokenizer(d.tokenizer, workdir=workdir, name=d.name, split=d.train_split,
                                          model_path=model_path, data_dir=d.data_dir,
                                          files=d.files, text_key=d.text_key)

    def init(self, rng: jax.Array):
        return self.model.init({"params": rng, "dropout": rng}, **self.model_inputs(self.dummy_batch()))

    def fit_length(self, batches: dict) -> dict:
        """Stacked train batches as the step gets them; tasks with padded sequences cut them to
        the longest row (see `data.pad_multiple`)."""
        return batches

    def tokens_in(self, batches: dict) -> int:
        """Tokens per example of stacked batches from `fit_length` (tokens/s and MFU count what
        the step computed): `tokens_per_example` unless the task cuts its token axes."""
        return self.tokens_per_example

    def parameter_sources(self) -> tuple[ParameterSource, ...]:
        """Other parameters the task needs (e.g. a distillation teacher); the trainer loads them
        and passes them to `pretrained`."""
        return ()

    def pretrained(self, sources: dict) -> dict:
        """Parameters (a nested dict of arrays) that take the place of fresh ones, made from the
        loaded `sources` ({name: parameters} of `parameter_sources`)."""
        return {}

    def sample(self, params) -> str | None:
        """Text to print at the end of training (a generation), or None."""
        return None

    def generation_metrics(self, params, split: str) -> dict:
        """Metrics that need decoding rather than a summed loss (e.g. BLEU); {} by default."""
        return {}

    @property
    def serving_task(self) -> "Task":
        """The task evaluation and prediction of a trained run use: itself, or (distillation)
        the task of the model that was trained."""
        return self

    # Helpers for subclasses.

    def set_vocab_size(self, needed: int) -> None:
        """Fills `model.vocab_size` (rounded up to `model.vocab_multiple`) or checks it is enough."""
        m = self.config.model
        if m.vocab_size <= 0:
            m.vocab_size = -(-needed // m.vocab_multiple) * m.vocab_multiple
        elif m.vocab_size < needed:
            raise ValueError(f"model.vocab_size={m.vocab_size} is smaller than the {needed} ids the "
                             "tokenizer and the task need")

    def build_model(self, **family_kwargs):
        """The family's model with quantization and the PEFT method attached (from outside)."""
        model = models.get(self.config.model, pipeline_parallel.from_config(self.config), **family_kwargs)
        return peft.attach(quantize.attach(model, quantize.from_config(self.config.model)), self.peft)

    def rngs(self, rng, train: bool) -> dict:
        return {"dropout": rng} if train and rng is not None else {}

    def process_kwargs(self) -> dict:
        return dict(process_index=jax.process_index(), process_count=jax.process_count())


class Predicts(abc.ABC):
    """A task capability: per-example predictions of a split or a file (`jaxlm.evaluate
    --data_path` writes them) and predictions for raw text (`jaxlm.predict`)."""

    @abc.abstractmethod
    def predictions(self, params, split: str, data_path: str = "") -> tuple[dict, list[dict]]:
        """(metrics, one row per example) of `split`, or of the file `data_path` when given."""

    @abc.abstractmethod
    def predict_text(self, params, text: str) -> dict:
        """The prediction for one raw text."""
