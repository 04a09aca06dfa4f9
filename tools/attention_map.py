r"""Attention heatmaps of a trained run for one text: every layer and head, one PNG per kind.

    python tools/attention_map.py --workdir=runs/t5_multi30k --text="A man is riding a bike." \
        [--target="Ein Mann fährt Fahrrad."] --output=runs/attention

A translation run draws the encoder's self-attention, the decoder's self-attention and the
cross-attention (decoder queries over source pieces) of `--text` and `--target` (default: the
run's own translation of the text); a classification, tagging or language-model run draws its
one stack. Writes OUTPUT/<kind>.png (e.g. decoder_cross_attn.png) and prints each path.
"""

import os
import sys

from absl import app, flags
from absl import logging as absl_logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxlm import attention_maps  # noqa: E402
from jaxlm.train import loop  # noqa: E402

FLAGS = flags.FLAGS


def write(workdir: str, text: str, target: str | None, output: str) -> list[str]:
    """Draws every kind of attention of `workdir`'s model for `text`; returns the PNG paths."""
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    run, params, _ = loop.restore_latest(workdir)
    maps = attention_maps.attention_maps(run.task, params, text, target)
    os.makedirs(output, exist_ok=True)
    paths = []
    for kind in sorted(maps.maps):
        figure = attention_maps.draw(maps, kind, title=f"{kind}: {text}")
        paths.append(os.path.join(output, kind.replace("/", "_") + ".png"))
        figure.savefig(paths[-1], dpi=100)
        plt.close(figure)
    return paths


def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)
    for path in write(FLAGS.workdir, FLAGS.text, FLAGS.target, FLAGS.output):
        print(path)


if __name__ == "__main__":  # flags defined here only: tests import `write` beside other tools
    flags.DEFINE_string("workdir", None, "A jaxlm run directory.")
    flags.DEFINE_string("text", None, "The text (the source sentence of a translation run).")
    flags.DEFINE_string("target", None, "A translation run's decoder text (default: its own translation).")
    flags.DEFINE_string("output", "attention", "The folder for the PNGs.")
    flags.mark_flags_as_required(["workdir", "text"])
    app.run(main)
