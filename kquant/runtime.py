"""Process settings a backend reads once, when it loads.

``import kquant`` calls :func:`configure` when the process is one of kquant's
entry points (the ``kquant`` console script, ``python -m benchmarks``,
``python -m kquant.benchmarks``: :data:`kquant.ENTRY_MODULES`), before Keras
loads its backend; imported as a library, kquant changes nothing. A value
already in the environment wins.

``TF_CPU_ALLOCATOR_USE_BFC=true``: TensorFlow's CPU allocator keeps freed
blocks for reuse (its best-fit-with-coalescing allocator) instead of handing
every buffer back to ``malloc``. An XLA-compiled train step allocates its
temporaries at every step, and a large one (a quantizer's intermediates on a
2048×2048 kernel: 16 MiB) otherwise comes back from the operating system page
by page. Measured on 2 CPU cores, TF 2.21, Dense 2048→2048, batch 128, SGD,
XLA (train step vs its float twin, one process each, interleaved): DoReFa-2
2.43× → 1.53×, uniform-HTGE 2.59× → 1.50×, sign 1.05× → 1.06×; the float step
itself 20.0 → 19.6 ms.

glibc ``malloc`` (Linux), through ``mallopt``, unless the environment already sets
any of glibc's own malloc variables (:data:`GLIBC_MALLOC_VARIABLES`): one arena
(``M_ARENA_MAX=1``), no ``mmap`` for large blocks (``M_MMAP_MAX=0``) and no
trimming of the heap's free top (``M_TRIM_THRESHOLD=2**31−1``). XLA:CPU (JAX)
allocates each compiled step's temporaries as one block, from a worker thread:
glibc serves a block over 32 MiB with a fresh ``mmap`` (a thread arena's heap is
at most 64 MiB, and the main arena's threshold caps at 32 MiB), which the kernel
zero-fills page by page at every step. With these settings the block comes from
the main heap and is reused; freed memory stays with the process (as TensorFlow's
and PyTorch's caching allocators keep theirs). Measured on 2 CPU cores, JAX 0.10,
Dense 2048→2048, batch 128, SGD (train step vs its float twin, interleaved):
TWN 2.8× → 1.45×, DoReFa-2 4.7× → 2.0×, uniform-HTGE 4.9× → 2.3×, the float
step unchanged (6.1 / 6.0 ms); TensorFlow with its BFC allocator unchanged.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

#: name → value set by :func:`configure` unless already set.
DEFAULTS = {"TF_CPU_ALLOCATOR_USE_BFC": "true"}

#: ``mallopt`` parameter → (its number in glibc's ``malloc.h``, value set by :func:`configure`)
MALLOC_OPTIONS = {"M_ARENA_MAX": (-8, 1), "M_MMAP_MAX": (-4, 0), "M_TRIM_THRESHOLD": (-1, 2**31 - 1)}

#: environment variables through which glibc takes malloc settings: if any is set,
#: the user has chosen and :func:`configure` leaves ``malloc`` alone
GLIBC_MALLOC_VARIABLES = ("GLIBC_TUNABLES", "MALLOC_ARENA_MAX", "MALLOC_ARENA_TEST",
                          "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                          "MALLOC_TOP_PAD_")

_malloc_applied: dict = {}


def configure(environ=None) -> dict:
    """Set each of :data:`DEFAULTS` not already in ``environ`` (default ``os.environ``).

    Does nothing once TensorFlow is loaded (it has read them then). Returns the
    settings now in effect, for the record (``{}`` when TensorFlow was loaded first).
    """
    environ = os.environ if environ is None else environ
    if "tensorflow" in sys.modules:
        return {}
    for name, value in DEFAULTS.items():
        environ.setdefault(name, value)
    if environ is os.environ:
        configure_malloc(environ)
    return settings(environ)


def configure_malloc(environ=None) -> dict:
    """Apply :data:`MALLOC_OPTIONS` with glibc's ``mallopt`` (once per process).

    Call it first thing in a script (threads that have allocated keep their arena).
    Nothing happens off glibc or when ``environ`` sets a :data:`GLIBC_MALLOC_VARIABLES`
    name. Returns the options in effect (``{}`` when none were applied).
    """
    environ = os.environ if environ is None else environ
    if _malloc_applied or any(name in environ for name in GLIBC_MALLOC_VARIABLES):
        return dict(_malloc_applied)
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return {}
    libc = ctypes.CDLL("libc.so.6")
    for name, (param, value) in MALLOC_OPTIONS.items():
        if libc.mallopt(param, value) != 1:
            raise RuntimeError(f"glibc mallopt({name}, {value}) failed.")
        _malloc_applied[name] = value
    return dict(_malloc_applied)


def settings(environ=None) -> dict:
    """The :data:`DEFAULTS` names and their values in ``environ`` (unset ones omitted),
    and the ``mallopt`` options :func:`configure_malloc` applied in this process."""
    environ = os.environ if environ is None else environ
    applied = {name: environ[name] for name in DEFAULTS if name in environ}
    if _malloc_applied:
        applied["mallopt"] = " ".join(f"{k}={v}" for k, v in _malloc_applied.items())
    return applied
