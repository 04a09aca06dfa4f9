r"""Tokenizes a corpus once into ArrayRecord shards of token windows for `data.prepared` runs.

    python tools/prepare_data.py --config=configs/gpt_corpus.py --output=/tmp/corpus \
        --config.data.files='/data/books/**/*.txt' [--workers=2] [--shard_mb=64]
    python tools/prepare_data.py --config=configs/gpt_corpus.py --output=/tmp/corpus \
        --jsonl='train=/data/web/*.jsonl' --jsonl='validation=/data/web_val.jsonl' \
        [--config.data.text_key=text]
    python -m jaxlm.main --config=configs/gpt_corpus.py --config.data.prepared=/tmp/corpus --workdir=...

The documents are those the run's config names (`data.name`, `data.files`, `data.text_key`:
local files, Tiny Shakespeare, any TFDS data set), or JSONL files (`--jsonl=SPLIT=GLOBS`, one JSON
object per line, its `data.text_key` field the document). The tokenizer is the run's
(`data.tokenizer`, `data.tokenizer_path`; a 'char' vocabulary comes from the train split) and is
saved as OUTPUT/tokenizer; windows hold `data.seq_len` + 1 tokens. Each split
(`data.train_split` and `data.eval_split`, or the --jsonl splits) becomes OUTPUT/SPLIT/ with its
shards and manifest.json (see `jaxlm/data/prepared.py`); a split that exists is an error, never
overwritten. Workers tokenize files (or ranges of documents) in parallel; memory stays bounded by
a unit's tokens per worker. The last line per split: tokens, windows, shards, seconds, peak RSS.
"""

from __future__ import annotations

import os
import resource
import sys
import time

from absl import app, flags
from ml_collections import config_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from jaxlm import tasks  # noqa: E402
from jaxlm.data import prepared, progress, tokenizers  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "The run's config (data source, tokenizer, seq_len).",
                                lock_config=True)
flags.DEFINE_string("output", None, "The corpus directory (OUTPUT/tokenizer, OUTPUT/SPLIT/).")
flags.DEFINE_multi_string("jsonl", [], "SPLIT=GLOBS: the JSONL files of a split (repeat per split); "
                                       "without it, the config's data source.")
flags.DEFINE_integer("workers", 0, "Tokenizing processes (0: the CPU count).")
flags.DEFINE_float("shard_mb", prepared.SHARD_BYTES / 2**20, "MiB of windows per shard.")
flags.mark_flags_as_required(["config", "output"])


def peak_rss_mib() -> float:
    """The largest resident set of this process and of any of its (finished) workers, in MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, workers) / 1024


def split_units(config) -> dict[str, list]:
    d = config.data
    if FLAGS.jsonl:
        splits = {}
        for item in FLAGS.jsonl:
            split, sep, globs = item.partition("=")
            if not sep or not split or not globs:
                raise app.UsageError(f"--jsonl={item!r}: write SPLIT=GLOBS, e.g. --jsonl='train=data/*.jsonl'.")
            splits[split] = prepared.jsonl_units(globs, d.text_key)
        return splits
    return {split: prepared.source_units(name=d.name, split=split, data_dir=d.data_dir, files=d.files,
                                         text_key=d.text_key)
            for split in dict.fromkeys([d.train_split, d.eval_split])}


def main(argv):
    del argv
    config = FLAGS.config
    units = split_units(config)
    tokenizer = tasks.get(config.task.name).build_tokenizer(config, FLAGS.output)
    tokenizer_dir = os.path.join(FLAGS.output, tokenizers.TOKENIZER_DIR)
    for split, split_units_ in units.items():
        start = time.time()
        bar = progress.progress(desc=f"{split}: tokenizing", total=len(split_units_), unit="unit")
        manifest = prepared.prepare(
            FLAGS.output, split, split_units_, tokenizer_dir=tokenizer_dir, seq_len=config.data.seq_len,
            workers=FLAGS.workers, shard_bytes=int(FLAGS.shard_mb * 2**20),
            description=f"{config.data.name} files={config.data.files!r}" if not FLAGS.jsonl else str(FLAGS.jsonl),
            progress=lambda done, total: bar.update(done - bar.n))
        bar.close()
        print(f"{split}: documents={manifest['documents']} tokens={manifest['tokens']} "
              f"windows={manifest['windows']} shards={len(manifest['shards'])} "
              f"tokenizer={tokenizer.kind}:{tokenizer.fingerprint} seconds={time.time() - start:.1f} "
              f"peak_rss_mib={peak_rss_mib():.0f}", flush=True)


if __name__ == "__main__":
    app.run(main)
