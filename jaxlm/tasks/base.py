"""What every task offers the trainer; the trainer knows nothing else about objectives.

A task owns the batch layout, its data pipeline, how to run the model on a batch, the loss and
the metrics. Losses are returned as sums with their weight so that gradient accumulation and
multi-device reduction stay exact.
"""

import os

import jax
import jax.numpy as jnp
import optax

from jaxlm import convert, models, peft
from jaxlm.data import tokenizers
from jaxlm.parallel import pipeline as pipeline_lib


def cross_entropy(logits, targets, weights=None):
    """Summed softmax cross-entropy (float32), correct predictions and weight over positions."""
    if weights is None:
        weights = jnp.ones(targets.shape, jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return jnp.sum(losses * weights), jnp.sum(correct * weights), jnp.sum(weights)


def mean_metrics(sums: dict, prefix: str = "") -> dict:
    """Mean `{prefix}loss` and `{prefix}accuracy` from summed loss, correct and weight."""
    weight = jnp.maximum(sums[f"{prefix}weight"], 1.0)
    return {f"{prefix}loss": sums[f"{prefix}loss"] / weight,
            f"{prefix}accuracy": sums[f"{prefix}correct"] / weight}


def hf_vocab(name: str) -> str:
    """The `vocab.txt` of a Hugging Face model folder or of an installed package shipping one."""
    hf_dir = convert.resolve(name) if name else None
    if hf_dir is None or not os.path.isfile(os.path.join(hf_dir, "vocab.txt")):
        raise FileNotFoundError(f"data.tokenizer='wordpiece' needs data.tokenizer_path: a vocab.txt, "
                                f"or a Hugging Face folder or package holding one (got {name!r})")
    return os.path.join(hf_dir, "vocab.txt")


class Task:
    """Base class: `config` is the run's config, `tokenizer` the run's tokenizer (or None).

    Subclasses set `self.model` (usually `self.build_model()` after fixing the vocabulary)
    and implement `dummy_batch`, `loss`, `summarize`, `train_iterator` and `eval_batches`.
    `trainable(name)` says which parameters train (see `jaxlm.peft`).
    """

    tokens_per_example = 0  # for tokens/s and MFU; 0 when the examples are not token sequences
    heads = ()  # regexes of the task's own new layers: they train under every PEFT method

    def __init__(self, config, tokenizer):
        self.config = config
        self.tokenizer = tokenizer
        self.peft = peft.from_config(config)
        self.trainable = peft.trainable_fn(config, self.heads)

    @classmethod
    def build_tokenizer(cls, config, workdir: str):
        """The run's tokenizer, saved in (or loaded from) `workdir/tokenizer`."""
        d = config.data
        model_path = d.tokenizer_path
        if d.tokenizer == "wordpiece" and not os.path.isfile(model_path):
            model_path = hf_vocab(model_path or config.init_from)
        return tokenizers.build_tokenizer(d.tokenizer, workdir=workdir, name=d.name, split=d.train_split,
                                          model_path=model_path, data_dir=d.data_dir,
                                          files=d.files, text_key=d.text_key)

    def set_vocab_size(self, needed: int) -> None:
        """Fills `model.vocab_size` (rounded up to `model.vocab_multiple`) or checks it is enough."""
        m = self.config.model
        if m.vocab_size <= 0:
            m.vocab_size = -(-needed // m.vocab_multiple) * m.vocab_multiple
        elif m.vocab_size < needed:
            raise ValueError(f"model.vocab_size={m.vocab_size} is smaller than the {needed} ids the "
                             "tokenizer and the task need")

    def build_model(self, **family_kwargs):
        return models.get(self.config.model, pipeline_lib.from_config(self.config), self.peft,
                          **family_kwargs)

    def init(self, rng: jax.Array):
        return self.model.init({"params": rng, "dropout": rng}, **self.model_inputs(self.dummy_batch()))

    def rngs(self, rng, train: bool) -> dict:
        return {"dropout": rng} if train and rng is not None else {}

    def fit_length(self, batches: dict) -> dict:
        """Stacked train batches as the step gets them; tasks with padded sequences cut them to
        the longest row (see `data.pad_multiple`)."""
        return batches

    def pretrained(self) -> dict:
        """Loaded parameters the task brings besides `init_from`'s (a nested dict of arrays,
        e.g. a distillation teacher); the trainer loads them again on every start."""
        return {}

    def sample(self, params) -> str | None:
        """Text to print at the end of training (a generation), or None."""
        return None

    def generation_metrics(self, params, split: str) -> dict:
        """Metrics that need decoding rather than a summed loss (e.g. BLEU); {} by default."""
        return {}

    def process_kwargs(self) -> dict:
        return dict(process_index=jax.process_index(), process_count=jax.process_count())
