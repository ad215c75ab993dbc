"""Real runtimes: ONNX (onnxruntime) and LiteRT/TFLite, with integer weights in the file.

Both start from the native inference model (:func:`~.native.load_inference_model`
of the model's own export, batch norms folded), so every format decodes the
same codes.

* **ONNX** — Keras' ``model.export(format="onnx")`` (tf2onnx) writes the float
  graph; each quantized kernel's float initializer is then replaced by its
  integer codes as an ``int8`` initializer feeding a standard
  ``DequantizeLinear`` (per output channel scale, zero point 0). We use the
  standard QDQ operators rather than QONNX ``Quant``/``BipolarQuant``: every
  ONNX runtime executes QDQ natively (onnxruntime fuses it into its integer
  kernels), whereas QONNX nodes live in a custom domain that onnxruntime
  cannot run. Levels are ``scale_c · v`` with ``v`` the integer grid of the
  quantizer (±1 for sign/BWN, odd integers for DoReFa, the level index for
  uniform), so the integers are the kquant levels themselves.
* **LiteRT** — Keras' ``model.export(format="litert")`` with
  ``optimizations=[DEFAULT]``: int8 per-channel weights (and int8
  activations with ``representative_data``), run by ``ai-edge-litert``.
"""

from __future__ import annotations

import itertools
import os
import tempfile

import numpy as np

from kquant.deploy.native import build_export, decode_table
from kquant.deploy.packing import unpack_codes

INSTALL_HINT = "pip install 'kquant[deploy]'"


def require(module, what):
    """Import ``module`` or fail with the install command."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{what} needs the `{module.split('.')[0]}` package: "
                          f"{INSTALL_HINT}") from e


def inference_model(model, fold_batch_norm=True):
    """``(inference model, export)``: the native round trip of ``model``, in memory."""
    from kquant.deploy.folding import fold_batch_norms
    from kquant.deploy.native import load_inference_model

    exp = build_export(model)
    if fold_batch_norm:
        fold_batch_norms(model, exp)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.npz")
        exp.write(path)
        inference = load_inference_model(path)
    shape = tuple(1 if d is None else d for d in inference.inputs[0].shape)
    inference(np.zeros(shape, np.float32), training=False)  # exporters need a called model
    return inference, exp


def integer_grid(levels):
    """``(v int8 [C, L], scale [C])`` with ``levels ≈ scale_c · v`` (rtol 1e-6)."""
    levels = np.asarray(levels, np.float64)
    scale = np.empty(levels.shape[0])
    for c, row in enumerate(levels):
        nonzero = np.abs(row[row != 0])
        scale[c] = nonzero.min() if nonzero.size else 1.0
    v = np.round(levels / scale[:, None])
    if np.abs(v).max() > 127 or not np.allclose(v * scale[:, None], levels, rtol=1e-6, atol=0):
        raise ValueError("levels are not an int8 grid times a per-channel scale (e.g. an "
                         "asymmetric offset); cannot store them as DequantizeLinear inputs.")
    return v.astype(np.int8), scale.astype(np.float32)


def quantized_kernels(exp):
    """Per quantized kernel of an export: ``(entry, float kernel, int8 kernel, scale, axis)``."""
    out = []
    for e in exp.entries:
        if e["kind"] != "quantized":
            continue
        p, shape = e["path"], tuple(e["shape"])
        codes = unpack_codes(exp.arrays[f"{p}:codes"], e["bits"], shape)
        levels = exp.arrays[f"{p}:levels"]
        v, scale = integer_grid(levels)
        out.append((e, decode_table(codes, levels, e["channel_axis"]),
                    decode_table(codes, v, e["channel_axis"]), scale, e["channel_axis"]))
    return out


def _match(kernel, initializer):
    """The axis permutation that turns ``kernel`` into ``initializer`` (reshaped), or None."""
    if kernel.size != initializer.size:
        return None
    for perm in itertools.permutations(range(kernel.ndim)):
        moved = np.transpose(kernel, perm)
        if np.array_equal(moved.reshape(initializer.shape), initializer):
            return perm
    return None


def _scale_axis(scale_full):
    """The one axis a broadcast scale tensor varies along (None: constant)."""
    if np.all(scale_full == scale_full.flat[0]):
        return None
    for axis in range(scale_full.ndim):
        others = tuple(a for a in range(scale_full.ndim) if a != axis)
        line = scale_full.max(axis=others) if others else scale_full
        if np.array_equal(scale_full.min(axis=others) if others else scale_full, line):
            return axis
    return "mixed"


def export_onnx(model, path, fold_batch_norm=True, opset_version=18):
    """Write ``model`` as ONNX with int8 weights behind ``DequantizeLinear``; return sizes."""
    onnx = require("onnx", "ONNX export")
    require("tf2onnx", "ONNX export")
    from onnx import helper, numpy_helper

    inference, exp = inference_model(model, fold_batch_norm)
    inference.export(str(path), format="onnx", opset_version=opset_version, verbose=False)
    proto = onnx.load(str(path))
    graph = proto.graph
    initializers = {init.name: init for init in graph.initializer}
    arrays = {name: numpy_helper.to_array(init) for name, init in initializers.items()}
    new_nodes, rows = [], []
    for entry, kernel, ints, scale, axis in quantized_kernels(exp):
        found = [(name, _match(kernel, a)) for name, a in arrays.items()
                 if a.dtype == np.float32 and a.size == kernel.size]
        found = [(name, perm) for name, perm in found if perm is not None]
        if len(found) != 1:
            raise RuntimeError(f"ONNX export: kernel {entry['path']!r} ({entry['layer']}) was "
                               f"not found once among the float initializers ({len(found)}).")
        name, perm = found[0]
        target = arrays[name].shape
        ints_onnx = np.transpose(ints, perm).reshape(target)
        if axis is None:
            scale_full = np.full(kernel.shape, scale[0], np.float32)
        else:
            scale_full = np.broadcast_to(
                scale.reshape([-1 if a == axis else 1 for a in range(kernel.ndim)]), kernel.shape)
        scale_onnx = np.transpose(scale_full, perm).reshape(target)
        onnx_axis = _scale_axis(scale_onnx)
        if onnx_axis == "mixed":
            raise RuntimeError(f"ONNX export: the per-channel scales of {entry['path']!r} do "
                               "not fall on one axis of the ONNX initializer.")
        if onnx_axis is None:
            scale_arr = np.asarray(scale_onnx.flat[0], np.float32)
            zero = np.asarray(0, np.int8)
        else:
            others = tuple(a for a in range(len(target)) if a != onnx_axis)
            scale_arr = scale_onnx.max(axis=others).astype(np.float32)
            zero = np.zeros(scale_arr.shape, np.int8)
        graph.initializer.remove(initializers[name])
        graph.initializer.extend([
            numpy_helper.from_array(ints_onnx.astype(np.int8), f"{name}_int8"),
            numpy_helper.from_array(scale_arr, f"{name}_scale"),
            numpy_helper.from_array(zero, f"{name}_zero_point")])
        attrs = {} if onnx_axis is None else {"axis": int(onnx_axis)}
        new_nodes.append(helper.make_node(
            "DequantizeLinear", [f"{name}_int8", f"{name}_scale", f"{name}_zero_point"], [name],
            name=f"{name}_dequantize", **attrs))
        rows.append({"layer": entry["layer"], "initializer": f"{name}_int8",
                     "bits": entry["bits"], "weights": int(kernel.size)})
    for node in reversed(new_nodes):
        graph.node.insert(0, node)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return {"path": str(path), "file_bytes": os.path.getsize(path), "kernels": rows}


def onnx_integer_weights(path):
    """``{initializer name: dtype}`` of every initializer feeding a DequantizeLinear."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    return {n.input[0]: inits[n.input[0]] for n in proto.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in inits}


def onnx_session(path, fused=True):
    """An onnxruntime CPU session. ``fused=True`` (onnxruntime's default) lets it fuse
    DequantizeLinear + MatMul into its integer ``MatMulNBits`` kernel; ``False`` keeps
    the basic graph optimizations only (float math on the dequantized weights)."""
    ort = require("onnxruntime", "Running ONNX")
    options = ort.SessionOptions()
    if not fused:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(path, x, fused=True, session=None):
    """Outputs of an ONNX file on ``x`` with onnxruntime (CPU)."""
    session = session or onnx_session(path, fused)
    return session.run(None, {session.get_inputs()[0].name: np.asarray(x, np.float32)})[0]


def export_litert(model, path, fold_batch_norm=True, representative_data=None):
    """Write ``model`` as LiteRT (int8 weights; int8 activations with ``representative_data``)."""
    require("tensorflow", "LiteRT export")
    import tensorflow as tf

    inference, exp = inference_model(model, fold_batch_norm)
    kwargs = {"optimizations": [tf.lite.Optimize.DEFAULT]}
    if representative_data is not None:
        data = np.asarray(representative_data, np.float32)
        kwargs["representative_dataset"] = lambda: ([data[i:i + 1]] for i in range(len(data)))
    inference.export(str(path), format="litert", verbose=False, **kwargs)
    return {"path": str(path), "file_bytes": os.path.getsize(path),
            "kernels": [{"layer": e["layer"], "bits": e["bits"]}
                        for e in exp.entries if e["kind"] == "quantized"]}


def litert_interpreter(path):
    """A ready ``ai_edge_litert`` interpreter for ``path`` (TensorFlow's as a fallback)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        Interpreter = require("tensorflow", "Running LiteRT").lite.Interpreter
    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    return interpreter


def run_litert(path, x, interpreter=None):
    """Outputs of a LiteRT file on ``x``, one sample at a time (batch 1 signature)."""
    interpreter = interpreter or litert_interpreter(path)
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    x = np.asarray(x, np.float32)
    if tuple(inp["shape"]) != x.shape:
        interpreter.resize_tensor_input(inp["index"], x.shape)
        interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(out["index"])


def litert_int8_weights(path):
    """``[(name, int8 array, scales)]`` of the int8 constant tensors of a LiteRT file."""
    interpreter = litert_interpreter(path)
    found = []
    for t in interpreter.get_tensor_details():
        if t["dtype"] == np.int8 and len(t["shape"]) >= 2:
            try:
                value = interpreter.get_tensor(t["index"])
            except ValueError:
                continue
            found.append((t["name"], value, t["quantization_parameters"]["scales"]))
    return found
