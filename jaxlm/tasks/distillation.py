"""Knowledge distillation: a student (the run's model) learns from a frozen teacher in one step.

The student's own task (`distill.student_task`: classification, token_classification or
causal_lm) is built on the run's config, so data, tokenizer, heads and metrics are its own; the
teacher (`distill.teacher`: a jaxlm workdir or a Hugging Face folder/package) is that task's
model with the teacher's architecture. The task declares the teacher as a parameter source; the
trainer loads it on every start and its parameters sit in the train state's frozen tree under
`teacher/` (never trained, never saved), so its forward pass runs inside the same jitted step. The student's parameters keep their plain names: a distilled
workdir serves as `init_from` of a plain student run, and evaluates and predicts as the student.

Loss (`jaxlm.compress.distill`), summed over the student task's targets:
  hard_weight * CE + soft_weight * T^2 * KL(teacher/T || student/T)
  + hidden_weight * MSE(projected student hidden states, teacher's)
  + attention_weight * KL(teacher attention || student attention).
Metrics: the student task's (`loss` is the cross-entropy on the labels), `distill_loss` (the
objective) and each term that runs (`kl`, `hidden`, `attention`).
"""

import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import tasks, tree
from jaxlm.compress import distill
from jaxlm.data import labeled, tokenizers
from jaxlm.tasks import base, classification

STUDENT_TASKS = ("classification", "token_classification", "causal_lm")
TEACHER = "teacher"  # the frozen tree's key of the teacher's parameters
PROJECTION = "distill"  # the key of the learned hidden-state projections
PRECOMPUTED = "precomputed_logits"  # teacher/precomputed_logits: one row per training example


def student_class(config):
    name = config.distill.student_task
    if name not in STUDENT_TASKS:
        raise ValueError(f"distill.student_task={name!r}: expected one of {list(STUDENT_TASKS)}")
    return tasks.get(name)


def teacher_config(config, source: str):
    """The teacher's config: its run's own (a jaxlm workdir: its data gives its labels) or the
    student's with the Hugging Face architecture; either way on the student's mesh."""
    t = base.source_config(config, source, "distill.teacher")
    if not base.is_workdir(source):  # a Hugging Face teacher: the student's task
        t.task.name = config.distill.student_task
    if t.task.name != config.distill.student_task:
        raise ValueError(f"distill.teacher={source!r} was trained on task {t.task.name!r}, but "
                         f"distill.student_task={config.distill.student_task!r}")
    if config.data.seq_len > t.model.max_len:
        raise ValueError(f"distill.teacher={source!r} reads {t.model.max_len} positions, fewer than "
                         f"data.seq_len={config.data.seq_len}")
    return t


class Distillation(base.Task):
    """`config.distill.student_task` trained from `config.distill.teacher` (see the module doc)."""

    def __init__(self, config, tokenizer):
        d = config.distill
        self.student = student_class(config)(config, tokenizer)
        self.heads = self.student.heads
        super().__init__(config, tokenizer)
        self.model = self.student.model
        self.tokens_per_example = self.student.tokens_per_example
        self.encoder = isinstance(self.student, classification.EncoderTask)
        check_weights(d)
        self.hidden, self.attention = d.hidden_weight > 0, d.attention_weight > 0
        self.precomputed = self.load_precomputed(d.teacher_logits) if d.teacher_logits else None
        self.runs_teacher = (d.soft_weight > 0 and self.precomputed is None) or self.hidden or self.attention
        if d.init_layers and config.init_from:
            raise ValueError(f"distill.init_layers={d.init_layers!r} and init_from={config.init_from!r} "
                             "both give the student's parameters: set one of them")
        self.teacher = None
        if self.runs_teacher or d.init_layers:
            if not d.teacher:
                raise ValueError("distill.teacher is empty: set it to the teacher's jaxlm workdir or "
                                 "Hugging Face folder/package")
            self.teacher = student_class(config)(teacher_config(config, d.teacher), tokenizer)
            self.check_teacher()
        self.layers = (distill.parse_layers(d.init_layers, config.model.num_layers,
                                            self.teacher.config.model.num_layers) if d.init_layers else None)
        self.projection = distill.HiddenProjection(self.teacher.config.model.emb_dim) if self.hidden else None
        self.trainable = self.student_trainable(self.trainable)

    def student_trainable(self, student_fn):
        """The teacher never trains; the projections always do; the student as its PEFT says."""
        return lambda name: not name.startswith(f"{TEACHER}/") and (
            name.startswith(f"{PROJECTION}/") or student_fn(name))

    def check_teacher(self) -> None:
        """The teacher must speak the student's vocabulary and labels (and heads, to match maps)."""
        d, m, t = self.config.distill, self.config.model, self.teacher.config.model
        if t.vocab_size != m.vocab_size:
            raise ValueError(f"distill.teacher={d.teacher!r} has a vocabulary of {t.vocab_size}, the "
                             f"student {m.vocab_size} (model.vocab_size): they must share the tokenizer")
        if self.encoder and self.teacher.head_specs() != self.student.head_specs():
            raise ValueError(f"distill.teacher={d.teacher!r} has heads {self.teacher.head_specs()}, the "
                             f"student {self.student.head_specs()}: the label sets differ")
        if self.attention and t.num_heads != m.num_heads:
            raise ValueError(f"distill.attention_weight={d.attention_weight} matches attention maps head "
                             f"by head: the teacher has {t.num_heads} heads, the student model.num_heads="
                             f"{m.num_heads}")
        if (self.hidden or self.attention) and (t.scan_layers or m.scan_layers):
            raise ValueError("distill.hidden_weight/attention_weight read each layer's output: they need "
                             "model.scan_layers=False in the student and the teacher")

    def load_precomputed(self, path: str) -> np.ndarray:
        if not isinstance(self.student, classification.SequenceClassification):
            raise ValueError(f"distill.teacher_logits={path!r}: precomputed logits are for "
                             "classification students only (one row per training example)")
        logits = np.load(path)
        shape = (len(self.student.examples(self.config.data.train_split)[0]), len(self.student.names))
        if logits.shape != shape:
            raise ValueError(f"distill.teacher_logits={path!r} holds logits {logits.shape}; the training "
                             f"split needs {shape} (examples, labels)")
        return logits.astype(np.float32)

    # What the trainer sees: the student task's data and metrics, the joint parameters.

    @classmethod
    def build_tokenizer(cls, config, workdir: str):
        """The student's tokenizer; a jaxlm teacher's own when the workdir has none yet, so the
        ids are the teacher's."""
        teacher_dir = os.path.join(config.distill.teacher, tokenizers.TOKENIZER_DIR)
        own_dir = os.path.join(workdir, tokenizers.TOKENIZER_DIR)
        if config.distill.teacher and tokenizers.exists(teacher_dir) and not tokenizers.exists(own_dir):
            tokenizers.load(teacher_dir).save(own_dir)
        return student_class(config).build_tokenizer(config, workdir)

    @property
    def serving_task(self):
        """Evaluation and prediction of a distilled run are the student task's."""
        return self.student

    def dummy_batch(self):
        return self.student.dummy_batch()

    def model_inputs(self, batch):
        return self.student.model_inputs(batch)

    def fit_length(self, batches):
        return self.student.fit_length(batches)

    def tokens_in(self, batches):
        return self.student.tokens_in(batches)

    def sample(self, params):
        return self.student.sample(params)

    def generation_metrics(self, params, split: str) -> dict:
        return self.student.generation_metrics(params, split)

    def eval_batches(self, split: str, max_batches: int, *args):
        return self.student.eval_batches(split, max_batches, *args)

    def train_iterator(self):
        """The student's batches; with precomputed logits each row also carries its `index`."""
        if self.precomputed is None:
            return self.student.train_iterator()
        s, c = self.student, self.config
        examples = s.examples(c.data.train_split)[0]
        return labeled.train_iterator(IndexedExamples(examples), lambda e: {**s.encode(e[1]), "index": np.int32(e[0])},
                                      global_batch_size=c.train.batch_size, seed=c.seed,
                                      bucket_batches=c.data.bucket_batches, **self.process_kwargs())

    def init(self, rng):
        variables = flax.core.unfreeze(self.student.init(rng))
        params = variables["params"]
        if self.runs_teacher:
            params[TEACHER] = flax.core.unfreeze(self.teacher.init(jax.random.fold_in(rng, 1))["params"])
        if self.precomputed is not None:
            params.setdefault(TEACHER, {})[PRECOMPUTED] = jnp.zeros(self.precomputed.shape, jnp.float32)
        if self.hidden:
            width = self.config.model.emb_dim
            states = [jnp.zeros((1, width))] * self.config.model.num_layers
            params[PROJECTION] = self.projection.init(jax.random.fold_in(rng, 2), states)["params"]
        return variables

    def parameter_sources(self) -> tuple:
        if self.teacher is None:
            return ()
        return (base.ParameterSource(TEACHER, self.config.distill.teacher, self.teacher.config),)

    def pretrained(self, sources: dict) -> dict:
        """The teacher's parameters (and precomputed logits) and, with `distill.init_layers`, the
        student's parameters taken from the teacher."""
        loaded = {}
        if self.teacher is not None:
            teacher = self.check_teacher_params(flax.core.unfreeze(sources[TEACHER]))
        if self.runs_teacher:
            loaded[TEACHER] = dict(teacher)
        if self.precomputed is not None:
            loaded.setdefault(TEACHER, {})[PRECOMPUTED] = self.precomputed
        if self.layers is not None:
            shapes = nn.unbox(jax.eval_shape(self.student.init, jax.random.key(0))["params"])
            loaded.update(distill.student_from_teacher(teacher, flax.core.unfreeze(shapes), self.layers))
        return loaded

    def check_teacher_params(self, params: dict) -> dict:
        """`params` if they hold every parameter the teacher's model has."""
        needed = tree.names(nn.unbox(jax.eval_shape(self.teacher.init, jax.random.key(0))["params"]))
        missing = sorted(set(needed) - set(tree.names(params)))
        if missing:
            raise ValueError(f"distill.teacher={self.config.distill.teacher!r} has no {', '.join(missing[:5])}"
                             f"{' ...' if len(missing) > 5 else ''}: a teacher needs the task's heads "
                             "(fine-tune it first and give its workdir)")
        return params

    # The objective.

    def loss(self, params, batch, rng=None, train: bool = False):
        d = self.config.distill
        student = {k: v for k, v in params.items() if k not in (TEACHER, PROJECTION)}
        out, captured = self.apply(self.student, student, batch, rng, train)
        logits = self.logits(out)
        targets, weights = self.targets(batch)
        hard, correct, weight = base.cross_entropy(logits, jnp.maximum(targets, 0), weights)
        sums = {"hard_loss": hard, "correct": correct, "weight": weight}
        total = d.hard_weight * hard
        teacher_out, teacher_captured = None, {}
        if self.runs_teacher:
            teacher_out, teacher_captured = jax.lax.stop_gradient(
                self.apply(self.teacher, params[TEACHER], batch, None, False))
        teacher_logits = None
        if self.precomputed is not None and train:
            teacher_logits = params[TEACHER][PRECOMPUTED][batch["index"]]
        elif d.soft_weight > 0 and teacher_out is not None:
            teacher_logits = self.logits(teacher_out)
        if teacher_logits is not None:
            sums["kl"] = jnp.sum(distill.soft_kl(logits, teacher_logits, d.temperature) * weights)
            total += d.soft_weight * sums["kl"]
        mask = batch["input_mask"] if self.encoder else jnp.ones(batch["inputs"].shape, jnp.float32)
        if self.hidden:
            student_states = self.projection.apply({"params": params[PROJECTION]},
                                                   distill.hidden_states(captured["intermediates"]))
            teacher_states = self.matched(distill.hidden_states(teacher_captured["intermediates"]))
            per_token = distill.hidden_mse(student_states, teacher_states, mask.shape)
            sums["hidden"] = distill.sum_over_targets(per_token, mask, weights)
            total += d.hidden_weight * sums["hidden"]
        if self.attention:
            per_token = distill.attention_kl(
                distill.attention_scores(captured[distill.ATTENTION_SCORES]),
                self.matched(distill.attention_scores(teacher_captured[distill.ATTENTION_SCORES])))
            sums["attention"] = distill.sum_over_targets(per_token, mask, weights)
            total += d.attention_weight * sums["attention"]
        sums["loss"] = total
        return total, sums

    def summarize(self, sums: dict) -> dict:
        """The student task's metrics on the labels, the objective and each distillation term."""
        metrics = dict(self.student.summarize({**sums, "loss": sums["hard_loss"]}))
        weight = jnp.maximum(sums["weight"], 1.0)
        metrics["distill_loss"] = sums["loss"] / weight
        metrics.update({k: sums[k] / weight for k in ("kl", "hidden", "attention") if k in sums})
        return metrics

    def apply(self, task, params, batch, rng, train: bool):
        """(model output, captured collections) of `task`'s model, capturing what the hidden and
        attention terms read."""
        kwargs = dict(deterministic=not train, rngs=task.rngs(rng, train))
        mutable = distill.mutable_collections(self.hidden, self.attention)
        if not mutable:
            return task.model.apply({"params": params}, **task.model_inputs(batch), **kwargs), {}
        if self.hidden:
            kwargs["capture_intermediates"] = distill.is_block
        model = distill.with_attention_maps(task.model) if self.attention else task.model
        return model.apply({"params": params}, **task.model_inputs(batch), mutable=mutable, **kwargs)

    def logits(self, out):
        return out[self.student.head] if self.encoder else out

    def targets(self, batch):
        """(targets, weights) as the student task counts them (-1: no target)."""
        if self.encoder:
            targets = batch[self.student.TARGET]
            return targets, (targets >= 0).astype(jnp.float32)
        targets = batch["targets"]
        return targets, batch.get("weights", jnp.ones(targets.shape, jnp.float32))

    def matched(self, teacher_layers: list) -> list:
        """The teacher layers the student's layers match, in student layer order."""
        return [teacher_layers[i] for i in distill.layer_map(self.config.model.num_layers, len(teacher_layers))]


class IndexedExamples:
    """A sequence of (index, example): train rows that know which example they are."""

    def __init__(self, examples):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return (i, self.examples[i])


def check_weights(d) -> None:
    for key in ("soft_weight", "hard_weight", "hidden_weight", "attention_weight"):
        if d[key] < 0:
            raise ValueError(f"distill.{key}={d[key]} must be >= 0")
    if d.temperature <= 0:
        raise ValueError(f"distill.temperature={d.temperature} must be > 0")
