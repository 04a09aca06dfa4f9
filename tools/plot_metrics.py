r"""Train and eval curves of one or several runs, overlaid and labelled, into a PNG.

    python tools/plot_metrics.py runs/sft runs/sft_lora --output=runs/sft_curves.png \
        [--keys=train/loss,eval/loss,eval/translate/bleu] [--labels=full,lora]

One panel per key (default: train/loss and eval/loss, and every other eval/* key the runs log),
one line per run (its folder name, or --labels), x = step, from each run's metrics.jsonl. A key no
run logs, or a folder without metrics.jsonl, is an error naming it. Prints the PNG's path.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxlm.train import metrics as metrics_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("output", "metrics.png", "The PNG to write.")
flags.DEFINE_list("keys", [], "Metric keys, one panel each (default: train/loss and the eval/* keys).")
flags.DEFINE_list("labels", [], "A label per run (default: the folder names).")


def default_keys(runs: list[dict]) -> list[str]:
    logged = set().union(*runs)
    evals = sorted(k for k in logged if k.startswith("eval/") and k not in ("eval/loss", "eval/perplexity"))
    return [k for k in ("train/loss", "eval/loss") if k in logged] + evals


def plot(runs: list[dict], labels: list[str], keys: list[str], output: str) -> str:
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    missing = [k for k in keys if not any(k in run for run in runs)]
    if missing:
        logged = sorted(set().union(*runs))
        raise ValueError(f"no run logs {missing}; the runs log {logged}")
    columns = min(len(keys), 3)
    rows = -(-len(keys) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.6 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for run, label in zip(runs, labels):
            if key in run:
                steps = sorted(run[key])
                ax.plot(steps, [run[key][s] for s in steps], marker="o" if len(steps) < 20 else None,
                        label=label)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    figure.savefig(output, dpi=100)
    plt.close(figure)
    return output


def main(argv):
    workdirs = argv[1:]
    if not workdirs:
        raise app.UsageError("name one or more run folders: python tools/plot_metrics.py RUN [RUN...]")
    labels = FLAGS.labels or [os.path.basename(os.path.normpath(w)) for w in workdirs]
    if len(labels) != len(workdirs):
        raise app.UsageError(f"--labels has {len(labels)} names for {len(workdirs)} runs")
    runs = [metrics_lib.read_curves(w) for w in workdirs]
    print(plot(runs, labels, FLAGS.keys or default_keys(runs), FLAGS.output))


if __name__ == "__main__":
    sys.exit(app.run(main))
