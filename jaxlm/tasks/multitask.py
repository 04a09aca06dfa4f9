"""Several fine-tuning tasks on one shared BERT encoder, e.g. SST-2 and CoNLL NER in one run.

`task.mixture` lists the parts as comma-separated `NAME=TASK:DATASET:WEIGHT` entries:

  task.mixture = "sst2=classification:jaxlm_sst2:1,conll=token_classification:jaxlm_conll2003:1"

Each part is the registered task TASK (a `classification.EncoderTask`: `classification` or
`token_classification`) built on a copy of the run's config with `task.name=TASK` and
`data.name=DATASET`, its head named `NAME_head`. The run's model is one BERT carrying every
part's head; train batches mix the parts' rows in proportion to WEIGHT
(`labeled.mixed_train_iterator`), each row tagged with its part's index in `task_id`.

The loss is one forward pass; each part's loss counts its own rows only and enters as a mean
(its summed loss over its targets), so a part with a target per token does not drown a part
with one per sentence. A batch thus counts as weight 1 (as in `mlm_nsp`). Metrics come per
part as `NAME/loss`, `NAME/accuracy` and the part's own (e.g. `conll/f1`), beside the total
`loss`.
"""

import copy
import math
import re
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from jaxlm import tasks
from jaxlm.data import labeled
from jaxlm.tasks import base, classification

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # part names become layer names and metric prefixes


class Part(NamedTuple):
    """One entry of `task.mixture`."""
    name: str
    task: str
    dataset: str
    weight: float

    @property
    def entry(self) -> str:
        return f"task.mixture entry '{self.name}={self.task}:{self.dataset}:{self.weight:g}'"


def parse_mixture(mixture: str) -> list[Part]:
    """The parts of a `task.mixture` string (see the module docstring).

    Raises:
      ValueError: naming the entry that is malformed, has a bad name or weight, or repeats a name.
    """
    parts = []
    for entry in mixture.split(","):
        entry = entry.strip()
        bad = f"task.mixture entry {entry!r}"
        name, equals, spec = entry.partition("=")
        fields = [f.strip() for f in spec.split(":")]
        if not equals or len(fields) != 3 or not all(fields):
            raise ValueError(f"{bad}: expected NAME=TASK:DATASET:WEIGHT, e.g. "
                             "'sst2=classification:jaxlm_sst2:1' (entries separated by commas)")
        name = name.strip()
        if not NAME.fullmatch(name):
            raise ValueError(f"{bad}: the name {name!r} must be letters, digits and '_' (it names "
                             "the head layer and the metrics)")
        if name in [p.name for p in parts]:
            raise ValueError(f"{bad}: the name {name!r} is used twice")
        try:
            weight = float(fields[2])
        except ValueError:
            weight = math.nan
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"{bad}: the weight {fields[2]!r} must be a positive number")
        parts.append(Part(name, fields[0], fields[1], weight))
    return parts


def part_class(part: Part):
    """The task class of `part`, which must be an encoder task with a head."""
    if part.task == "multitask":
        raise ValueError(f"{part.entry}: a mixture cannot hold a mixture")
    try:
        cls = tasks.get(part.task)
    except ValueError as e:
        raise ValueError(f"{part.entry}: {e}") from None
    if not issubclass(cls, classification.EncoderTask):
        raise ValueError(f"{part.entry}: task {part.task!r} has no head to share a BERT with; "
                         "expected a fine-tuning task such as classification or "
                         "token_classification")
    return cls


def part_config(config, part: Part):
    """A copy of the run's config as the part's own single-task run would have it."""
    c = copy.deepcopy(config)
    c.task.name, c.data.name, c.task.mixture = part.task, part.dataset, ""
    return c


class MultiTask(base.Task, base.Predicts):
    """The parts of `config.task.mixture` on one BERT: `tasks` maps each name to its task."""

    def __init__(self, config, tokenizer):
        self.parts = parse_mixture(config.task.mixture)
        classes = [part_class(part) for part in self.parts]  # before reading any data
        self.tasks = {}
        for part, cls in zip(self.parts, classes):
            try:
                self.tasks[part.name] = cls(part_config(config, part), tokenizer,
                                            head=f"{part.name}_head")
            except (ValueError, FileNotFoundError) as e:
                raise type(e)(f"{part.entry}: {e}") from e
        self.heads = tuple(h for task in self.tasks.values() for h in task.heads)
        super().__init__(config, tokenizer)
        self.first = next(iter(self.tasks.values()))  # the parts share inputs and batch layout
        self.set_vocab_size(self.first.config.model.vocab_size)
        self.tokens_per_example = config.data.seq_len
        self.model = self.build_model(heads=sum((t.head_specs() for t in self.tasks.values()), ()))
        for task in self.tasks.values():
            task.model = self.model  # their forward passes and predictions run the shared model,
            task._predict = self.first._predict  # compiled once for all of them

    @classmethod
    def build_tokenizer(cls, config, workdir: str):
        """The first part's tokenizer (a trained one, e.g. 'char', sees only its data set)."""
        part = parse_mixture(config.task.mixture)[0]
        return part_class(part).build_tokenizer(part_config(config, part), workdir)

    def dummy_batch(self):
        return self.first.dummy_batch()

    def model_inputs(self, batch):
        return self.first.model_inputs(batch)

    def fit_length(self, batches):
        return self.first.fit_length(batches)

    def tokens_in(self, batches):
        return self.first.tokens_in(batches)

    def loss(self, params, batch, rng=None, train: bool = False):
        out = self.first.forward(params, batch, rng, train)
        total, sums = 0.0, {}
        for i, (name, task) in enumerate(self.tasks.items()):
            loss, task_sums = task.loss_from(out, own_rows(batch, i, task.TARGET))
            total += loss / jnp.maximum(task_sums["weight"], 1.0)
            sums.update({f"{name}/{k}": v for k, v in task_sums.items()})
        return total, {"loss": total, "weight": jnp.ones((), jnp.float32), **sums}

    def summarize(self, sums: dict) -> dict:
        """Each task's mean `NAME/loss` and `NAME/accuracy` over its targets; `loss` is the
        mean over batches of the batch's loss."""
        metrics = {"loss": sums["loss"] / jnp.maximum(sums["weight"], 1.0)}
        for name in self.tasks:
            metrics.update(base.mean_metrics(sums, prefix=f"{name}/"))
        return metrics

    def train_iterator(self):
        c = self.config
        datasets = [(t.examples(t.config.data.train_split)[0], t.encode)
                    for t in self.tasks.values()]
        return labeled.mixed_train_iterator(datasets, [p.weight for p in self.parts],
                                            global_batch_size=c.train.batch_size, seed=c.seed,
                                            **self.process_kwargs())

    def eval_batches(self, split: str, max_batches: int):
        """Every part's first `max_batches` batches of `split` (0: all), each filled up with the
        other parts' keys as the train batches are, and tagged with the part's `task_id`."""
        per_task = [t.eval_batches(split, max_batches) for t in self.tasks.values()]
        first_rows = [{k: v[0] for k, v in batches[0].items()} for batches in per_task]
        fill = labeled.fill_values(first_rows)  # what mixed_train_iterator fills
        filled = []
        for i, batches in enumerate(per_task):
            for batch in batches:
                rows = len(batch["input_ids"])
                missing = {k: np.broadcast_to(v, (rows, *v.shape)) for k, v in fill.items()}
                filled.append({**missing, **batch, "task_id": np.full(rows, i, np.int32)})
        return filled

    def generation_metrics(self, params, split: str) -> dict:
        """Each part's own (e.g. `conll/f1`): what its single-task run reports."""
        return {f"{name}/{k}": v for name, task in self.tasks.items()
                for k, v in task.generation_metrics(params, split).items()}

    def predictions(self, params, split: str, data_path: str = "") -> tuple[dict, list[dict]]:
        """(metrics prefixed `NAME/`, rows tagged with their part's `task`) over every part's
        split, or with `data_path` = 'NAME=PATH,...' over the named parts' files only."""
        paths = self.data_paths(data_path)
        metrics, rows = {}, []
        for name, task in self.tasks.items():
            if data_path and name not in paths:
                continue
            task_metrics, task_rows = task.predictions(params, split, paths.get(name, ""))
            metrics.update({f"{name}/{k}": v for k, v in task_metrics.items()})
            rows += [{"task": name, **row} for row in task_rows]
        return metrics, rows

    def predict_text(self, params, text: str) -> dict:
        """Every part's prediction for `text`, by part name."""
        return {name: task.predict_text(params, text) for name, task in self.tasks.items()}

    def data_paths(self, data_path: str) -> dict:
        """{part name: file} from 'NAME=PATH,...' (files hold each part's own format)."""
        paths = {}
        for entry in filter(None, (e.strip() for e in data_path.split(","))):
            name, _, path = entry.partition("=")
            if name.strip() not in self.tasks or not path.strip():
                raise ValueError(f"data path entry {entry!r}: a multi-task run reads NAME=PATH "
                                 f"with NAME one of {list(self.tasks)}")
            paths[name.strip()] = path.strip()
        return paths


def own_rows(batch: dict, task_id: int, target: str) -> dict:
    """`batch` with the targets of rows of other tasks set to -1 (even where two tasks share a
    target key, each counts only its own rows)."""
    targets = batch[target]
    mine = (batch["task_id"] == task_id).reshape(targets.shape[:1] + (1,) * (targets.ndim - 1))
    return {**batch, target: jnp.where(mine, targets, labeled.IGNORE)}
