r"""Trains a sentencepiece tokenizer on local text files.

  python tools/train_tokenizer.py --files='/usr/lib/python3*/json/*.py' \
      --vocab_size=1000 --model_type=bpe --output=/tmp/spm/python

writes /tmp/spm/python.model (and .vocab) and prints the path of the .model.
Load it with `jaxlm.data.tokenizers.create('sentencepiece', model_path=...)`.

Special ids: pad=0, eos=1, unk=2, bos=3 (pad 0 so that zero-padded batches are
padding). The model is lossless: no normalization, whitespace and newlines
kept, so decode(encode(text)) == text. `byte_fallback` is on, so any text encodes (characters outside the
vocabulary become UTF-8 byte pieces); the 4 specials, the 256 byte pieces and
one piece per covered character count towards `--vocab_size`, so choose it
well above 260 (lower `--character_coverage` if training says the vocabulary is
smaller than the required characters).
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Iterator, Sequence

from absl import app, flags

from jaxlm.data import tokenizers


def expand_globs(files: str) -> list[str]:
    """Returns the sorted files matching comma-separated globs; errors if none match."""
    patterns = [p.strip() for p in files.split(",") if p.strip()]
    if not patterns:
        raise ValueError('--files is empty; give a glob such as --files="data/*.txt".')
    paths = set()
    for pattern in patterns:
        paths.update(
            p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)
        )
    if not paths:
        raise FileNotFoundError(f"No files match --files={files!r}.")
    return sorted(paths)


def iter_lines(paths: Sequence[str]) -> Iterator[str]:
    """Yields the lines of `paths`, newline included (invalid UTF-8 decoded as U+FFFD)."""
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            yield from f


def train(
    files: str,
    *,
    vocab_size: int,
    model_type: str,
    output: str,
    character_coverage: float = 0.9995,
    input_sentence_size: int = 0,
    num_threads: int = 0,
) -> str:
    """Trains a sentencepiece model and returns the path of the `.model` file.

    Args:
      files: comma-separated globs of UTF-8 text files.
      vocab_size: size of the vocabulary, specials and byte pieces included.
      model_type: 'bpe' or 'unigram'.
      output: model prefix; writes OUTPUT.model and OUTPUT.vocab.
      character_coverage: fraction of characters that get their own piece.
      input_sentence_size: sample at most this many lines (0: all).
      num_threads: trainer threads (0: all CPU cores).

    Returns:
      The path of the written `.model` file.
    """
    return tokenizers.train_sentencepiece(
        iter_lines(expand_globs(files)), vocab_size=vocab_size, path=output, model_type=model_type,
        keep_whitespace=True, character_coverage=character_coverage,
        input_sentence_size=input_sentence_size, num_threads=num_threads)


def main(argv) -> int:
    del argv
    args = flags.FLAGS
    try:
        path = train(
            args.files,
            vocab_size=args.vocab_size,
            model_type=args.model_type,
            output=args.output,
            character_coverage=args.character_coverage,
            input_sentence_size=args.input_sentence_size,
            num_threads=args.num_threads,
        )
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":  # flags defined here only: other modules may import `train`
    flags.DEFINE_string("files", None, "comma-separated globs of text files")
    flags.DEFINE_integer("vocab_size", 8000, "pieces in the vocabulary")
    flags.DEFINE_enum("model_type", "bpe", ["bpe", "unigram"], "sentencepiece model type")
    flags.DEFINE_string("output", None, "model prefix: writes OUTPUT.model")
    flags.DEFINE_float("character_coverage", 0.9995, "share of characters the vocabulary covers")
    flags.DEFINE_integer("input_sentence_size", 0, "sample at most this many lines (0: all)")
    flags.DEFINE_integer("num_threads", 0, "0: all CPU cores")
    flags.mark_flags_as_required(["files", "output"])
    app.run(main)
