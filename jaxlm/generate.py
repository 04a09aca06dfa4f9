"""Samples text from a trained run: `python -m jaxlm.generate --workdir=DIR --prompt="ROMEO:"`.

The text goes to stdout, logs to stderr.
"""

from absl import app, flags
from absl import logging as absl_logging

from jaxlm.infer import sampling
from jaxlm.train import loop

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A jaxlm run directory (config.json, tokenizer, checkpoints).")
flags.DEFINE_string("prompt", "\n", "Text to continue.")
flags.DEFINE_integer("max_new_tokens", 200, "Tokens to sample.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_float("temperature", 0.8, "0 means greedy.")
flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0: all).")
flags.DEFINE_float("top_p", 1.0, "Keep the smallest set of tokens with this much probability.")
flags.DEFINE_integer("num_samples", 1, "Independent samples of the same prompt.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)  # no Orbax INFO lines around the text
    run, params, _ = loop.restore_latest(FLAGS.workdir)
    sample = run.config.sample
    sample.update(dict(prompt=FLAGS.prompt, max_new_tokens=FLAGS.max_new_tokens,
                       temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p))
    for i in range(FLAGS.num_samples):
        print(sampling.sample_text(run.task.model, params, run.tokenizer, sample, seed=FLAGS.seed + i),
              flush=True)


def run():
    """The `jaxlm-generate` command."""
    app.run(main)


if __name__ == "__main__":
    run()
