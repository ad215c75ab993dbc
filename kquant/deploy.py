"""Deployable weights: the quantized kernels a model really uses, bit-packed.

:func:`export_weights` writes one ``.npz`` holding, per quantized layer, the
kernel's level indices packed at the quantizer's bitwidth
(``ceil(n·bits/8)`` bytes) and the few floats that turn them back into values
(e.g. BWN's scales); every other variable a forward pass needs (biases,
batch-norm statistics, input-quantizer steps) as float32; and the model's
architecture. :func:`load_inference_model` rebuilds the model with its
quantized layers holding the decoded kernels (kernel quantizers removed,
input quantizers kept), so its predictions equal the training model's
``predict`` exactly. :func:`inspect_export` reports what was stored.
"""

from __future__ import annotations

import json
import math

import keras
import numpy as np

from kquant import quantizers
from kquant.callbacks import quantized_layers

FORMAT = "kquant-deploy-1"


def pack_codes(codes, bits):
    """Pack integers in ``[0, 2^bits)`` into ``ceil(codes.size·bits/8)`` bytes."""
    flat = np.asarray(codes, dtype=np.int64).ravel()
    if flat.size and (flat.min() < 0 or flat.max() >= 2**bits):
        raise ValueError(f"codes must be in [0, {2**bits}) for bits={bits}.")
    planes = (flat[:, None] >> np.arange(bits)) & 1
    return np.packbits(planes.astype(np.uint8).ravel())


def unpack_codes(packed, bits, shape):
    n = math.prod(shape)
    planes = np.unpackbits(np.asarray(packed, np.uint8), count=n * bits).reshape(n, bits)
    return (planes.astype(np.int64) << np.arange(bits)).sum(axis=1).reshape(shape)


def _key(path):
    return path.replace("/", "|")


def export_weights(model, path):
    """Write ``model``'s deployable weights to ``path`` (``.npz``); return a size report."""
    arrays = {}
    report = []
    latent = set()
    for layer in quantized_layers(model):
        q = layer.kernel_quantizer
        if q is None:
            continue
        kernel = layer.latent_kernel
        latent.add(kernel.path)
        codes, params = q.encode(kernel)
        packed = pack_codes(codes, q.precision)
        prefix = f"q|{_key(kernel.path)}"
        arrays[f"{prefix}|codes"] = packed
        arrays[f"{prefix}|shape"] = np.asarray(codes.shape, np.int64)
        arrays[f"{prefix}|bits"] = np.asarray(q.precision, np.int64)
        for name, value in params.items():
            arrays[f"{prefix}|param|{name}"] = np.asarray(value, np.float32)
        arrays[f"{prefix}|quantizer"] = np.asarray(json.dumps(quantizers.serialize(q)))
        report.append({"layer": layer.name, "bits": q.precision, "weights": int(codes.size),
                       "packed_bytes": int(packed.nbytes),
                       "float32_bytes": int(codes.size * 4)})
    kernel_quantizer_vars = {
        v.path for layer in quantized_layers(model) if layer.kernel_quantizer is not None
        for v in layer.kernel_quantizer.weights
    }
    for v in model.weights:
        if v.path in latent or v.path in kernel_quantizer_vars:
            continue
        arrays[f"f|{_key(v.path)}"] = np.asarray(keras.ops.convert_to_numpy(v), np.float32)
    arrays["model_config"] = np.asarray(model.to_json())
    arrays["format"] = np.asarray(FORMAT)
    np.savez_compressed(path, **arrays)
    return report


def _inference_config(config):
    """Model config with every kernel quantizer removed (kernels arrive decoded)."""
    if isinstance(config, dict):
        out = {k: _inference_config(v) for k, v in config.items()}
        if "kernel_quantizer" in out and "input_quantizer" in out:
            out["kernel_quantizer"] = None
        return out
    if isinstance(config, list):
        return [_inference_config(v) for v in config]
    return config


def load_inference_model(path):
    """The inference model stored by :func:`export_weights`."""
    data = np.load(path, allow_pickle=False)
    if str(data["format"]) != FORMAT:
        raise ValueError(f"{path}: not a kquant deploy file (format {data['format']!r}).")
    config = _inference_config(json.loads(str(data["model_config"])))
    model = keras.models.model_from_json(json.dumps(config))
    missing = []
    for v in model.weights:
        qkey = f"q|{_key(v.path)}"
        fkey = f"f|{_key(v.path)}"
        if f"{qkey}|codes" in data:
            shape = tuple(int(d) for d in data[f"{qkey}|shape"])
            codes = unpack_codes(data[f"{qkey}|codes"], int(data[f"{qkey}|bits"]), shape)
            quantizer = quantizers.get(json.loads(str(data[f"{qkey}|quantizer"])))
            params = {k.rsplit("|", 1)[-1]: data[k] for k in data.files
                      if k.startswith(f"{qkey}|param|")}
            v.assign(keras.ops.convert_to_numpy(quantizer.decode(codes, params)))
        elif fkey in data:
            v.assign(data[fkey])
        else:
            missing.append(v.path)
    if missing:
        raise ValueError(f"{path}: no stored value for {missing}.")
    return model


def inspect_export(path):
    """Per quantized kernel: bits, weight count, packed bytes, distinct decoded values."""
    data = np.load(path, allow_pickle=False)
    rows = []
    for key in data.files:
        if key.startswith("q|") and key.endswith("|codes"):
            prefix = key[: -len("|codes")]
            bits = int(data[f"{prefix}|bits"])
            shape = tuple(int(d) for d in data[f"{prefix}|shape"])
            codes = unpack_codes(data[key], bits, shape)
            rows.append({"kernel": prefix[2:].replace("|", "/"), "bits": bits,
                         "weights": math.prod(shape), "packed_bytes": int(data[key].nbytes),
                         "distinct_codes": int(np.unique(codes).size)})
    return rows
