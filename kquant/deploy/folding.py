"""BatchNorm folding into the quantized layer before it (for deployment).

``BN(W·x + b) = g ⊙ (W·x) + (b − μ)·g + β`` with ``g = γ/√(σ² + ε)`` per output
channel (Jacob et al. 2018, §3.2). The codes stay the same; each channel's level
table is scaled by ``g`` (``fold_scale``, stored so the loader can still check
the levels against the quantizer) and the bias becomes ``(b − μ)·g + β``. The
BatchNormalization layer is replaced by ``Identity`` in the inference config.
Folds every Dense/Conv1D/Conv2D (channels_last, no activation) with a kernel
quantizer whose only consumer is a BatchNormalization over the last axis.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from kquant.deploy.paths import structure


def fold_pairs(model):
    """``[(quantized layer path, layer, batch-norm path, batch norm)]`` that can be folded."""
    from kquant.layers import QuantConv1D, QuantConv2D, QuantDense

    _, layers = structure(model)
    path_of = {id(layer): p for p, layer in layers.items()}
    pairs = []
    for path, layer in layers.items():
        if not isinstance(layer, (QuantDense, QuantConv1D, QuantConv2D)):
            continue
        if layer.kernel_quantizer is None or layer.activation not in (None, keras.activations.linear):
            continue
        if getattr(layer, "data_format", "channels_last") != "channels_last":
            continue
        nodes = layer._outbound_nodes
        if len(nodes) != 1 or not isinstance(nodes[0].operation, keras.layers.BatchNormalization):
            continue
        bn = nodes[0].operation
        rank = len(layer.latent_kernel.shape) if isinstance(layer, QuantDense) else layer.rank + 2
        if len(bn._inbound_nodes) != 1 or bn.axis not in (-1, rank - 1) or id(bn) not in path_of:
            continue
        pairs.append((path, layer, path_of[id(bn)], bn))
    return pairs


def _find_config(config, names):
    """The layer config reached by following layer ``names`` through nested models."""
    for name in names:
        config = next(c for c in config["config"]["layers"] if c["config"]["name"] == name)
    return config


def _names(model, path):
    names, m = [], model
    for index in path.split("/"):
        layer = m.layers[int(index)]
        names.append(layer.name)
        m = layer
    return names


def fold_batch_norms(model, exp):
    """Fold in place every pair of :func:`fold_pairs` into the :class:`~.native.Export`."""
    folded = []
    for qpath, layer, bnpath, bn in fold_pairs(model):
        kkey = f"{qpath}/kernel"
        entry = exp.entry(kkey)
        rank = len(entry["shape"])
        if entry["channel_axis"] not in (None, rank - 1):
            continue
        channels = entry["shape"][-1]
        mean = np.asarray(ops.convert_to_numpy(bn.moving_mean), np.float64)
        var = np.asarray(ops.convert_to_numpy(bn.moving_variance), np.float64)
        gamma = np.asarray(ops.convert_to_numpy(bn.gamma), np.float64) if bn.scale else 1.0
        beta = np.asarray(ops.convert_to_numpy(bn.beta), np.float64) if bn.center else 0.0
        g = gamma / np.sqrt(var + bn.epsilon) * np.ones(channels)
        levels = np.broadcast_to(exp.arrays[f"{kkey}:levels"], (channels, 2 ** entry["bits"]))
        exp.arrays[f"{kkey}:levels"] = (levels * g[:, None]).astype(np.float32)
        exp.arrays[f"{kkey}:fold_scale"] = g.astype(np.float32)
        entry.update(channel_axis=rank - 1, fold_scale=True)
        bias_key = f"{qpath}/bias"
        bias = exp.arrays.pop(f"{bias_key}:value", np.zeros(channels, np.float32))
        exp.entries = [e for e in exp.entries
                       if e["path"] != bias_key and not e["path"].startswith(bnpath + "/")]
        exp.arrays = {k: v for k, v in exp.arrays.items() if not k.startswith(bnpath + "/")}
        exp.add({"path": bias_key, "kind": "float", "shape": [channels], "dtype": "float32"},
                value=((bias - mean) * g + beta).astype(np.float32))
        _find_config(exp.config, _names(model, qpath))["config"]["use_bias"] = True
        bn_config = _find_config(exp.config, _names(model, bnpath))
        identity = keras.saving.serialize_keras_object(
            keras.layers.Identity(name=bn.name, dtype=bn.dtype_policy.name))
        for k in ("class_name", "module", "registered_name", "config"):
            bn_config[k] = identity.get(k)
        for node in bn_config.get("inbound_nodes", []):  # Identity takes no `mask`/`training`
            if isinstance(node, dict):
                node["kwargs"] = {}
        folded.append((layer.name, bn.name))
    return folded
