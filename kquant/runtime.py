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
"""

from __future__ import annotations

import os
import sys

#: name → value set by :func:`configure` unless already set.
DEFAULTS = {"TF_CPU_ALLOCATOR_USE_BFC": "true"}


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
    return settings(environ)


def settings(environ=None) -> dict:
    """The :data:`DEFAULTS` names and their values in ``environ`` (unset ones omitted)."""
    environ = os.environ if environ is None else environ
    return {name: environ[name] for name in DEFAULTS if name in environ}
