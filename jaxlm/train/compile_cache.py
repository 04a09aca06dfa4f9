"""XLA's persistent compilation cache: compiled programs are written to disk, and a later run (or
tool) that compiles the same program on the same backend loads it instead of compiling again.
Start-up is most of a short run's overhead: a train call, the eval step and a decoder per batch
shape. The cache key covers the program, its shardings, the backend and the JAX/XLA versions and
flags, so a hit runs the executable the compile would have built.
"""

import os

import jax
from jax.experimental.compilation_cache import compilation_cache

MAX_BYTES = 4 * 2**30  # least recently used entries go beyond this; the cap also turns on the
# cache's file lock, which keeps concurrent runs from reading an entry another is still writing
MIN_COMPILE_SECONDS = 0.5  # quicker compiles are not written: each write scans the whole folder


def use(path: str) -> None:
    """Caches compiled programs under `path` from the next compile on ('' turns the cache off)."""
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    path = os.path.abspath(os.path.expanduser(path)) if path else None
    if jax.config.jax_compilation_cache_dir == path:
        return
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    compilation_cache.reset_cache()  # a process that compiled before reads the new setting
