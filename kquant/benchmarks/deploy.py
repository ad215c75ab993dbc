"""Deployment: file size and inference latency of a trained model, float vs low-bit.

Part 1 (``section = model``): a binary-weight convnet (BWN per channel, sign
inputs, DoReFa-2 and 4-bit dense, BN folded) trained on the digits, exported as

* the float twin: the native inference model as a Keras ``.keras`` file and as
  a plain float32 ``.npz`` of its weights, ONNX float (``model.export``),
  LiteRT float;
* low-bit: the native ``.npz`` (bit-packed codes), ONNX with int8 weights
  behind ``DequantizeLinear`` (onnxruntime fuses them into ``MatMulNBits``),
  LiteRT with int8 weights (``optimizations=[DEFAULT]``).

Latency at batch 1 and 64 on this CPU, one thread per runtime, variants timed
interleaved in one process (best of ``rounds``; medians in ``results.json``);
ratios are to the float file of the same runtime. ONNX/LiteRT rows need the TensorFlow backend.

Part 2 (``section = xnor``): one binary Dense layer (sign weights and inputs)
of ``K → N``: float32 ``x @ W`` (NumPy BLAS, one thread) vs the XNOR + popcount
kernel of :mod:`kquant.deploy.xnor` (numba, one thread, input packing
included), exact integer results checked. Physical bound: one 64-bit
XOR + popcount does 64 binary MACs; against AVX2 FMA (2 × 8 float32 MACs per
cycle) that is 4× when compute-bound, and weights are 32× smaller when
memory-bound (batch 1). The same for one binary 3×3 ``same`` Conv2D of
``H×W×C → F``: float32 im2col + BLAS vs input packing + the XNOR/popcount
convolution (:func:`kquant.deploy.xnor.binary_conv2d`, implicit im2col over
packed pixel words, zero padding skipped), exact integers checked.
Options: ``rounds`` (timing repetitions).
"""

from __future__ import annotations

import os
import tempfile
import time

import keras
import numpy as np

from kquant.benchmarks.common import Result, require, set_seed

# the -o KEY=VALUE settings this benchmark reads (others are refused)
OPTIONS = {
    "rounds": "timed inference rounds per runtime",
}

XNOR_SIZES = {"tiny": [(256, 256)], "quick": [(256, 256), (1024, 1024), (4096, 4096)],
              "full": [(256, 256), (1024, 1024), (4096, 4096), (8192, 8192)]}
XNOR_CONV_SIZES = {"tiny": [(8, 64, 64)], "quick": [(16, 64, 64), (8, 256, 256)],
                   "full": [(16, 64, 64), (8, 256, 256), (32, 128, 128)]}
COLUMNS = ["section", "variant", "runtime", "file_kb", "size_vs_float", "batch", "latency_ms",
           "latency_vs_float", "max_abs_diff", "argmax_agree"]


def _interleaved(fns, rounds):
    """Best (minimum) seconds of each ``fns[name]()`` over ``rounds``, the variants
    alternating every round (the minimum is the least disturbed by other processes,
    as ``timeit`` recommends; the medians go to ``meta``)."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    _MEDIANS.append({name: float(np.median(t)) for name, t in times.items()})
    return {name: float(np.min(t)) for name, t in times.items()}


_MEDIANS: list = []


def _convnet(input_shape, width):
    import kquant

    return keras.Sequential([
        keras.Input(input_shape),
        kquant.QuantConv2D(width, 3, padding="same", use_bias=False,
                           kernel_quantizer=kquant.quantizer("bwn", per_channel=True)),
        keras.layers.BatchNormalization(), keras.layers.ReLU(),
        kquant.QuantConv2D(2 * width, 3, padding="same", use_bias=False, input_quantizer="sign",
                           kernel_quantizer=kquant.quantizer("bwn", per_channel=True)),
        keras.layers.BatchNormalization(), keras.layers.ReLU(), keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        kquant.QuantDense(4 * width, kernel_quantizer=kquant.quantizer("dorefa", bits=2)),
        keras.layers.ReLU(),
        kquant.QuantDense(10, kernel_quantizer=kquant.quantizer("uniform", bits=4)),
    ])


def _model_rows(cfg, folder, rounds):
    from kquant.datasets import load
    from kquant.deploy import export_weights, runtimes

    (x, y), (xt, yt) = load("digits")
    keep = len(xt) // 64 * 64  # whole batches of 64: shardable over any replica count
    xt, yt = xt[:keep], yt[:keep]
    width = 8 if cfg.tiny else 32
    model = _convnet(x.shape[1:], width)
    model.compile(keras.optimizers.Adam(3e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(x, y, epochs=cfg.epochs_or(4, 10, 1), batch_size=64, verbose=0)
    accuracy = float(model.evaluate(xt, yt, verbose=0)[1])
    # Direct calls, not ``predict``: under MirroredStrategy Keras' predict returns
    # 2× the rows when the last batch cannot be split across the replicas.
    reference = np.concatenate([keras.ops.convert_to_numpy(model(xt[i:i + 64], training=False))
                                for i in range(0, len(xt), 64)])
    inference, _ = runtimes.inference_model(model, fold_batch_norm=True)
    files = {"keras_float": os.path.join(folder, "float.keras"),
             "native": os.path.join(folder, "native.npz")}
    inference.save(files["keras_float"])
    files["npz_float"] = os.path.join(folder, "float.npz")
    np.savez(files["npz_float"], *[np.asarray(w, np.float32) for w in inference.get_weights()])
    export_weights(model, files["native"], fold_batch_norm=True)
    runners = {}
    batches = {1: xt[:1], 64: xt[:64]}
    if cfg.strategy == "data_parallel":  # a batch of 1 cannot be sharded over the replicas
        del batches[1]
    runners["keras_float"] = lambda b: keras.ops.convert_to_numpy(inference(b, training=False))
    notes = {}
    if keras.backend.backend() == "tensorflow" and _importable("onnxruntime", "tf2onnx", "onnx"):
        import onnxruntime as ort

        files["onnx_float"] = os.path.join(folder, "float.onnx")
        inference.export(files["onnx_float"], format="onnx", verbose=False)
        files["onnx_int8"] = os.path.join(folder, "int8.onnx")
        runtimes.export_onnx(model, files["onnx_int8"])
        for name in ("onnx_float", "onnx_int8"):
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            session = ort.InferenceSession(files[name], options, providers=["CPUExecutionProvider"])
            runners[name] = (lambda s: lambda b: runtimes.run_onnx(None, b, session=s))(session)
    else:
        notes["onnx"] = "omitted: needs the TensorFlow backend and kquant[deploy]"
    if keras.backend.backend() == "tensorflow" and _importable("ai_edge_litert"):
        from ai_edge_litert.interpreter import Interpreter

        files["litert_float"] = os.path.join(folder, "float.tflite")
        inference.export(files["litert_float"], format="litert", verbose=False)
        files["litert_int8"] = os.path.join(folder, "int8.tflite")
        runtimes.export_litert(model, files["litert_int8"])
        for name in ("litert_float", "litert_int8"):
            interpreters = {}
            for b, data in batches.items():
                it = Interpreter(model_path=files[name], num_threads=1)
                inp = it.get_input_details()[0]
                it.resize_tensor_input(inp["index"], data.shape)
                it.allocate_tensors()
                interpreters[b] = it
            runners[name] = (lambda its: lambda b: runtimes.run_litert(
                None, b, interpreter=its[len(b)]))(interpreters)
    else:
        notes["litert"] = "omitted: needs the TensorFlow backend and ai-edge-litert"
    sizes = {k: os.path.getsize(p) for k, p in files.items()}
    rows = []
    for b, data in batches.items():
        times = _interleaved({k: (lambda f, d: lambda: f(d))(f, data) for k, f in runners.items()},
                             rounds)
        for name in runners:
            runtime = name.split("_")[0]
            float_name = {"native": "keras_float"}.get(name, f"{runtime}_float")
            out = np.concatenate([np.asarray(runners[name](xt[i:i + 64]))
                                  for i in range(0, len(xt), 64)]) if b == 64 else None
            row = {"section": "model", "variant": name, "runtime": runtime,
                   "file_kb": sizes[name] / 1024, "size_vs_float": sizes[name] / sizes[float_name],
                   "batch": b, "latency_ms": 1e3 * times[name],
                   "latency_vs_float": times[name] / times[float_name]}
            if out is not None:
                row["max_abs_diff"] = float(np.abs(out - reference).max())
                row["argmax_agree"] = float((out.argmax(1) == reference.argmax(1)).mean())
            rows.append(row)
    rows += [{"section": "model", "variant": name, "runtime": "npz",
              "file_kb": sizes[name] / 1024, "size_vs_float": sizes[name] / sizes["npz_float"]}
             for name in ("npz_float", "native")]
    return rows, {"test_accuracy": accuracy, "width": width, **notes}


def _importable(*modules):
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in modules)


def _xnor_rows(cfg, rounds):
    from threadpoolctl import threadpool_limits

    import numba

    from kquant.deploy import xnor

    numba.set_num_threads(1)
    rng = np.random.default_rng(cfg.seed)
    rows = []
    with threadpool_limits(1):
        for k, n in XNOR_SIZES[cfg.scale]:
            w = rng.standard_normal((k, n)).astype(np.float32)
            w_sign = np.where(w >= 0, 1.0, -1.0).astype(np.float32)
            packed = xnor.pack_signs(w.T)
            for batch in (1, 64):
                x = rng.standard_normal((batch, k)).astype(np.float32)
                x_sign = np.where(x >= 0, 1.0, -1.0).astype(np.float32)
                exact = np.array_equal(xnor.binary_matmul(xnor.pack_signs(x), packed, k),
                                       (x_sign @ w_sign).astype(np.int32))
                times = _interleaved({
                    "float": lambda: x_sign @ w_sign,
                    "xnor": lambda: xnor.binary_matmul(xnor.pack_signs(x), packed, k)}, rounds)
                for name in ("float", "xnor"):
                    rows.append({"section": "xnor", "variant": f"dense {k}→{n} {name}",
                                 "runtime": "numpy BLAS" if name == "float" else "numba popcount",
                                 "file_kb": (4 * k * n if name == "float" else packed.nbytes) / 1024,
                                 "size_vs_float": 1.0 if name == "float" else packed.nbytes / (4 * k * n),
                                 "batch": batch, "latency_ms": 1e3 * times[name],
                                 "latency_vs_float": times[name] / times["float"],
                                 "exact": exact,
                                 "gmacs": batch * k * n / times[name] / 1e9})
        for size, c, f in XNOR_CONV_SIZES[cfg.scale]:
            rows += _xnor_conv_rows(rng, size, c, f, rounds)
    return rows


def _xnor_conv_rows(rng, size, c, f, rounds):
    from kquant.deploy import xnor

    kernel = rng.standard_normal((3, 3, c, f)).astype(np.float32)
    w_sign = np.where(kernel >= 0, 1.0, -1.0).astype(np.float32)
    w_matrix = w_sign.reshape(-1, f)
    packed = xnor.pack_conv_kernel(kernel)
    rows = []
    for batch in (1, 64):
        x = rng.standard_normal((batch, size, size, c)).astype(np.float32)
        x_sign = np.where(x >= 0, 1.0, -1.0).astype(np.float32)

        def float_conv():
            patches = xnor.im2col(x_sign, (3, 3), (1, 1), "same")
            return (patches.reshape(-1, w_matrix.shape[0]) @ w_matrix).reshape(
                patches.shape[:3] + (f,))

        def binary_conv():
            return xnor.binary_conv2d(x, packed, (1, 1), "same")

        exact = np.array_equal(binary_conv(), float_conv().astype(np.int32))
        times = _interleaved({"float": float_conv, "xnor": binary_conv}, rounds)
        macs = batch * size * size * 9 * c * f
        for name in ("float", "xnor"):
            nbytes = 4 * kernel.size if name == "float" else packed.nbytes
            rows.append({"section": "xnor",
                         "variant": f"conv3x3 {size}x{size}x{c}→{f} {name}",
                         "runtime": "numpy im2col+BLAS" if name == "float"
                         else "numba popcount",
                         "file_kb": nbytes / 1024, "size_vs_float": nbytes / (4 * kernel.size),
                         "batch": batch, "latency_ms": 1e3 * times[name],
                         "latency_vs_float": times[name] / times["float"],
                         "exact": exact, "gmacs": macs / times[name] / 1e9})
    return rows


def run(cfg):
    require(modules=("numba", "threadpoolctl"))
    set_seed(cfg.seed)
    _MEDIANS.clear()
    rounds = int(cfg.option("rounds", 5 if cfg.tiny else 50))
    with tempfile.TemporaryDirectory() as folder:
        model_rows, meta = _model_rows(cfg, folder, rounds)
    rows = model_rows + _xnor_rows(cfg, rounds)
    meta.update(rounds=rounds, medians_s=list(_MEDIANS), threads="1 per runtime (onnxruntime intra_op, LiteRT num_threads, "
                "BLAS via threadpoolctl, numba)",
                bound="64 binary MACs per XOR+popcount word; vs AVX2 FMA (16 float32 MACs/cycle) "
                      "4x compute-bound; 32x fewer weight bytes (memory-bound, batch 1)",
                note="latencies are the best of interleaved rounds in one process; the "
                     "machine was shared with other jobs, so absolute times are noisy")
    return Result("deploy", rows, meta=meta, columns=COLUMNS + ["exact", "gmacs"])
