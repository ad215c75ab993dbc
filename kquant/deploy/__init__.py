"""Deployment: a trained kquant model leaves as a real low-bit model.

* :func:`export_weights` / :func:`load_inference_model` — the native, versioned,
  bit-packed format (:mod:`kquant.deploy.native`), bit-identical predictions,
  validated on load (:class:`DeployFormatError` names the array);
  ``fold_batch_norm=True`` folds BatchNorm into the quantized layer before it
  (:mod:`kquant.deploy.folding`).
* :func:`alq_storage_report` — ALQ arrays on disk next to ALQ Eq. 26 storage.
* :func:`export_onnx`, :func:`export_litert` — real runtimes
  (:mod:`kquant.deploy.runtimes`, ``pip install 'kquant[deploy]'``).
* :mod:`kquant.deploy.xnor` — XNOR + popcount inference for binary layers (numba).
* :func:`export_model` — one entry point for every format (``kquant export``).

Names load on first use, so ``kquant export --help`` does not import Keras.
"""

from __future__ import annotations

import importlib

_NAMES = {
    "FORMAT": "native", "VERSION": "native", "DeployFormatError": "native",
    "export_weights": "native", "inspect_export": "native", "load_inference_model": "native",
    "pack_codes": "packing", "packed_size": "packing", "unpack_codes": "packing",
    "alq_storage_report": "alq_storage", "format_alq_storage": "alq_storage",
    "fold_batch_norms": "folding", "fold_pairs": "folding",
    "export_onnx": "runtimes", "export_litert": "runtimes", "run_onnx": "runtimes",
    "run_litert": "runtimes", "export_model": "cli",
}

__all__ = sorted(_NAMES)


def __getattr__(name):
    if name in _NAMES:
        value = getattr(importlib.import_module(f"kquant.deploy.{_NAMES[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kquant.deploy' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_NAMES))
