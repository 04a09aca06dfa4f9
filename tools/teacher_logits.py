"""Precomputes a classification teacher's logits on its training split, once, for distillation.

    python tools/teacher_logits.py --teacher=/tmp/sst2 --output=/tmp/sst2_logits.npy
    python -m jaxlm.main --config=configs/distill_sst2.py --workdir=/tmp/sst2_student \
        --config.distill.teacher=/tmp/sst2 --config.distill.teacher_logits=/tmp/sst2_logits.npy

The output is float32 [training examples, labels], row i the teacher's logits for example i of
the split (as `jaxlm.data.labeled` reads it, without shuffling). With it the student's step does
not run the teacher (the teacher is still read for `distill.init_layers`). Only sentence
classification: a language model's logits over every position of every window are too large.
"""


from absl import app, flags
import jax
import numpy as np

from jaxlm.tasks import classification
from jaxlm.train import loop


def teacher_logits(teacher: str, split: str = "") -> np.ndarray:
    """The teacher run's logits on every example of `split` (default: its training split)."""
    run, params, _ = loop.restore_latest(teacher)
    task = run.task
    if not isinstance(task, classification.SequenceClassification):
        raise ValueError(f"--teacher={teacher}: a {run.config.task.name!r} run; precomputed logits "
                         "are for classification teachers only")
    split = split or run.config.data.train_split
    logits = np.zeros((len(task.examples(split)[0]), len(task.names)), np.float32)
    for batch in task.eval_batches(split, 0):
        out = jax.device_get(task._predict(params, {k: batch[k] for k in classification.ENCODER_KEYS}))
        rows = batch["index"] >= 0
        logits[batch["index"][rows]] = out[task.head][rows]
    return logits


def main(argv):
    del argv
    args = flags.FLAGS
    logits = teacher_logits(args.teacher, args.split)
    np.save(args.output, logits)
    print(f"wrote {logits.shape} logits of {args.teacher} to {args.output}")


if __name__ == "__main__":  # flags defined here only: tests import this module beside other tools
    flags.DEFINE_string("teacher", None, "the teacher's jaxlm workdir")
    flags.DEFINE_string("output", None, "the .npy file to write")
    flags.DEFINE_string("split", "", "default: the teacher's training split")
    flags.mark_flags_as_required(["teacher", "output"])
    app.run(main)
