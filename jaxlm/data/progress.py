"""Progress bars for the loops over data that take a while outside training: beam decoding and
generation over an eval split, predictions over a file, data preparation. tqdm on stderr, from
process 0 only, gone when done (`leave=False`: logs keep the figures, not the bars)."""

import sys

import jax
import tqdm


def progress(iterable=None, *, desc: str, total: int | None = None, unit: str = "batch"):
    return tqdm.tqdm(iterable, desc=desc, total=total, unit=unit, file=sys.stderr, dynamic_ncols=True,
                     mininterval=1.0, leave=False, disable=jax.process_index() != 0)
