"""Session set-up for kquant's and its plugins' tests, loaded before their conftests.

JAX compiles the same small train steps again and again: every test builds new
Keras models, so every jitted step is a new function, yet their HLO repeats
(same layers, same shapes). A persistent compilation cache shared by the
pytest-xdist workers and the benchmark subprocesses the tests start compiles
each program once per test session. One fresh folder per session, removed at exit
by the process that made it; a ``JAX_COMPILATION_CACHE_DIR`` already set is used
as it is. Executables are looked up by their HLO, options and JAX version, so what
runs is what an uncached compile gives; only the compile time is saved.
"""

import atexit
import os
import shutil
import tempfile

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="kquant-tests-jax-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_cache,
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
