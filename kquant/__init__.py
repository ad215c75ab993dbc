"""kquant: quantization-aware training for Keras 3.

Quantized layers (:mod:`kquant.layers`) apply a forward quantizer
(:mod:`kquant.quantizers`) whose backward pass is a pluggable gradient
estimator (:mod:`kquant.estimators`, entry-point group ``kquant.estimators``).

``import kquant`` registers every kquant Keras-serializable class (layers,
quantizers, ALQ, optimizers), so ``keras.saving.load_model`` reloads kquant
models after a plain ``import kquant``. Only the ``kquant`` console script (and
``python -m kquant.cli``) skips that (its commands import what they use), so
``kquant --help`` does not import Keras or a backend. Submodules and top-level names resolve lazily
(PEP 562).
"""

from __future__ import annotations

import importlib

# ``kquant.summary`` is the function (the submodule has the same name); it
# imports only rich, so binding it eagerly is cheap and keeps the name stable.
from kquant.summary import summary

__version__ = "0.1.0"

SUBMODULES = (
    "accounting", "alq", "analysis", "bench", "benchmarks", "callbacks", "cli", "convert",
    "datasets", "deploy", "estimators", "layers", "models", "optimizers", "plots", "quantizers",
    "registry", "staircase", "summary", "testing", "training",
)

# top-level name -> submodule that defines it
_NAMES = {
    "QuantActivation": "layers",
    "QuantConv1D": "layers",
    "QuantConv1DTranspose": "layers",
    "QuantConv2D": "layers",
    "QuantConv2DTranspose": "layers",
    "QuantConv3D": "layers",
    "QuantConv3DTranspose": "layers",
    "QuantDense": "layers",
    "QuantDepthwiseConv1D": "layers",
    "QuantDepthwiseConv2D": "layers",
    "QuantEinsumDense": "layers",
    "QuantGRU": "layers",
    "QuantLSTM": "layers",
    "QuantMultiHeadAttention": "layers",
    "QuantSeparableConv1D": "layers",
    "QuantSeparableConv2D": "layers",
    "quantize_model": "convert",
    "Quantizer": "quantizers",
    "quantizer": "quantizers",
}


def _is_submodule(name):
    import importlib.util

    return importlib.util.find_spec(f"kquant.{name}") is not None


def __getattr__(name):
    if name in _NAMES:
        value = getattr(importlib.import_module(f"kquant.{_NAMES[name]}"), name)
    elif name in SUBMODULES or (not name.startswith("_") and _is_submodule(name)):
        value = importlib.import_module(f"kquant.{name}")
    else:
        raise AttributeError(f"module 'kquant' has no attribute {name!r}")
    globals()[name] = value
    return value


def register_serializables() -> None:
    """Import every module that registers Keras-serializable kquant classes."""
    for module in ("layers", "quantizers", "alq", "optimizers", "analysis"):
        importlib.import_module(f"kquant.{module}")


def _launched_as_cli() -> bool:
    """Whether this process is the ``kquant`` console script or ``python -m kquant.cli``."""
    import os
    import sys

    argv0 = sys.argv[0] if sys.argv else ""
    return os.path.splitext(os.path.basename(argv0))[0] == "kquant" or _module_run() == "kquant.cli"


def _module_run():
    """The module of ``python -m MODULE``, or ``None`` (``sys.orig_argv``: during ``-m``'s
    package import ``sys.argv[0]`` is ``"-m"``)."""
    import sys

    argv = list(getattr(sys, "orig_argv", []))
    return argv[argv.index("-m") + 1] if "-m" in argv[:-1] else None


def _launched_as_entry_point() -> bool:
    """The ``kquant`` console script, or ``python -m`` of kquant's CLI or benchmarks."""
    return _launched_as_cli() or _module_run() in ENTRY_MODULES


#: ``python -m`` modules that are kquant entry points (they get :func:`kquant.runtime.configure`)
ENTRY_MODULES = ("kquant.cli", "benchmarks", "kquant.benchmarks")


def __dir__():
    return sorted(set(globals()) | set(_NAMES) | set(SUBMODULES))


__all__ = [
    "QuantActivation",
    "QuantConv1D",
    "QuantConv1DTranspose",
    "QuantConv2D",
    "QuantConv2DTranspose",
    "QuantConv3D",
    "QuantConv3DTranspose",
    "QuantDense",
    "QuantDepthwiseConv1D",
    "QuantDepthwiseConv2D",
    "QuantEinsumDense",
    "QuantGRU",
    "QuantLSTM",
    "QuantMultiHeadAttention",
    "QuantSeparableConv1D",
    "QuantSeparableConv2D",
    "Quantizer",
    "alq",
    "analysis",
    "callbacks",
    "optimizers",
    "estimators",
    "quantize_model",
    "summary",
    "quantizer",
    "datasets",
    "deploy",
    "models",
    "quantizers",
    "staircase",
]

if _launched_as_entry_point():  # backend process settings, before Keras loads a backend
    from kquant import runtime as _runtime

    _runtime.configure()
if not _launched_as_cli():
    register_serializables()
