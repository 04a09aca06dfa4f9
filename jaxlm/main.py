"""Launches a run: `python -m jaxlm.main --config=configs/NAME.py --workdir=DIR [--config.a.b=v]`."""

import logging

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from jaxlm.parallel import distributed
from jaxlm.train import loop

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and the resolved config go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax and Grain are chatty at INFO
    logging.getLogger("jaxlm").setLevel(logging.INFO)
    distributed.initialize(FLAGS.config)
    loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)


def run():
    """The `jaxlm-train` command."""
    app.run(main)


if __name__ == "__main__":
    run()
