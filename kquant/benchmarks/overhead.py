"""Train-step time of quantized vs float layers: Dense and Conv2D at several sizes.

Each model is one layer (``Input → Dense`` or ``Input → Conv2D 3×3 same``)
trained with SGD on a mean-squared error, so the step time is the layer's
forward + backward + update. Variants of one size are timed interleaved in
one process (:func:`benchmarks.common.compare_step_times`) and reported as a
ratio to the float layer:

* ``float``: the Keras layer;
* ``sign_w``: kquant binary weights (Sign, its default estimator);
* ``sign_wa``: binary weights and binary inputs;
* ``dorefa2_w``: DoReFa 2-bit weights (STE);
* ``uniform2_w_htge``: 2-bit uniform weights with learned step and HTGE.

When ``larq`` (with ``tf_keras``) is importable on the TensorFlow backend,
Larq's ``QuantDense``/``QuantConv2D`` (``ste_sign`` weights, and weights +
inputs) and a ``tf_keras`` float layer are timed alongside; otherwise the
result says so (report, not a requirement).
Options: ``variants`` (list), ``larq`` (false to skip).
"""

from __future__ import annotations

import importlib.util

import keras
import numpy as np

from kquant.benchmarks.common import (
    Result,
    compare_step_times,
    option_names,
    set_seed,
    strategy_scope,
    timing_steps,
)

# (input features, units) for Dense; (height = width, channels in = out) for Conv2D
SIZES = {
    "tiny": {"dense": [(32, 32)], "conv2d": [(8, 4)]},
    "quick": {"dense": [(256, 256), (1024, 1024), (2048, 2048)],
              "conv2d": [(16, 16), (16, 64), (16, 128)]},
    "full": {"dense": [(1024, 1024), (4096, 4096), (8192, 8192)],
             "conv2d": [(32, 64), (32, 256), (56, 256)]},
}

VARIANTS = {
    "float": None,
    "sign_w": {"kernel_quantizer": "sign"},
    "sign_wa": {"kernel_quantizer": "sign", "input_quantizer": "sign"},
    "dorefa2_w": {"kernel_quantizer": {"name": "dorefa", "config": {"bits": 2, "estimator": "ste"}}},
    "uniform2_w_htge": {"kernel_quantizer": {"name": "uniform",
                                             "config": {"bits": 2, "estimator": "htge"}}},
}

TINY_VARIANTS = ["float", "sign_wa", "uniform2_w_htge"]  # smoke-test scale

COLUMNS = ["layer", "size", "variant", "params", "step_ms", "time_vs_float", "time_vs_larq"]


def _layer(kind, size, quant):
    import kquant

    n = size[1]
    if kind == "dense":
        return keras.layers.Dense(n) if quant is None else kquant.QuantDense(n, **quant)
    if quant is None:
        return keras.layers.Conv2D(n, 3, padding="same")
    return kquant.QuantConv2D(n, 3, padding="same", **quant)


def _input_shape(kind, size):
    return (size[0],) if kind == "dense" else (size[0], size[0], size[1])


def _model(kind, size, quant, eager):
    model = keras.Sequential([keras.Input(_input_shape(kind, size)), _layer(kind, size, quant)])
    model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse", run_eagerly=eager,
                  **({} if _jit_ok() else {"jit_compile": False}))
    return model


def _jit_ok():
    from kquant.benchmarks.common import jit_compile_allowed

    return jit_compile_allowed()


def larq_available() -> bool:
    """Larq runs on ``tf_keras`` (Keras 2): only on the TensorFlow backend, when both import."""
    return (keras.backend.backend() == "tensorflow"
            and importlib.util.find_spec("larq") is not None
            and importlib.util.find_spec("tf_keras") is not None)


def _larq_models(kind, size):
    """tf_keras float layer and Larq's binary layers of the same size (report only)."""
    import larq
    import tf_keras

    n = size[1]
    shape = _input_shape(kind, size)
    variants = {
        "larq_float": None,
        "larq_sign_w": {"kernel_quantizer": "ste_sign", "kernel_constraint": "weight_clip"},
        "larq_sign_wa": {"kernel_quantizer": "ste_sign", "kernel_constraint": "weight_clip",
                         "input_quantizer": "ste_sign"},
    }
    models = {}
    for name, quant in variants.items():
        if kind == "dense":
            layer = tf_keras.layers.Dense(n) if quant is None else larq.layers.QuantDense(n, **quant)
        else:
            layer = (tf_keras.layers.Conv2D(n, 3, padding="same") if quant is None
                     else larq.layers.QuantConv2D(n, 3, padding="same", **quant))
        model = tf_keras.Sequential([tf_keras.Input(shape), layer])
        model.compile(optimizer=tf_keras.optimizers.SGD(1e-3), loss="mse")
        models[name] = model
    return models


def run(cfg):
    sizes = SIZES[cfg.scale]
    names = option_names(cfg, "variants", TINY_VARIANTS if cfg.tiny else list(VARIANTS), VARIANTS,
                         "overhead")
    if "float" not in names:
        names = ["float", *names]
    use_larq = bool(cfg.option("larq", True)) and larq_available()
    eager = bool(cfg.option("eager", False))
    rng = np.random.default_rng(cfg.seed)
    rows = []
    for kind in ("dense", "conv2d"):
        batch = cfg.batch_size if kind == "dense" else max(1, cfg.batch_size // 4)
        for size in sizes[kind]:
            set_seed(cfg.seed)
            shape = _input_shape(kind, size)
            out = (size[1],) if kind == "dense" else (size[0], size[0], size[1])
            x = rng.standard_normal((batch, *shape)).astype("float32")
            y = rng.standard_normal((batch, *out)).astype("float32")
            with strategy_scope(cfg):
                models = {name: _model(kind, size, VARIANTS[name], eager) for name in names}
            if use_larq:
                models.update(_larq_models(kind, size))
            times = compare_step_times(models, x, y, batch, steps=timing_steps(cfg),
                                       warmup=1 if cfg.tiny else 3)
            label = f"{size[0]}→{size[1]}" if kind == "dense" else f"{size[0]}×{size[0]}×{size[1]}"
            for name, model in models.items():
                row = {"layer": kind, "size": label, "variant": name, "batch": batch,
                       "params": int(model.count_params()), "step_ms": 1e3 * times[name],
                       "time_vs_float": times[name] / times["float"]}
                twin = {"sign_w": "larq_sign_w", "sign_wa": "larq_sign_wa", "float": "larq_float"}
                if name in twin and twin[name] in times:
                    row["time_vs_larq"] = times[name] / times[twin[name]]
                rows.append(row)
    meta = {
        "sizes": sizes, "optimizer": "SGD", "loss": "mse", "timing_steps": timing_steps(cfg),
        "eager": eager,
        "larq": _larq_version() if use_larq else
        "not importable here (needs larq + tf_keras on the TensorFlow backend): larq rows omitted",
    }
    return Result("overhead", rows, meta=meta, plot=lambda path: _plot(rows, path), columns=COLUMNS)


def _larq_version():
    import larq

    return f"larq {getattr(larq, '__version__', '?')}"


def _plot(rows, path):
    import matplotlib.pyplot as plt

    kinds = ["dense", "conv2d"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, kind in zip(axes, kinds):
        sel = [r for r in rows if r["layer"] == kind]
        sizes = list(dict.fromkeys(r["size"] for r in sel))
        variants = list(dict.fromkeys(r["variant"] for r in sel))
        width = 0.8 / max(len(variants), 1)
        for i, v in enumerate(variants):
            vals = [next((r["time_vs_float"] for r in sel if r["size"] == s and r["variant"] == v), 0.0)
                    for s in sizes]
            ax.bar(np.arange(len(sizes)) + i * width, vals, width, label=v)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(np.arange(len(sizes)) + 0.4 - width / 2, sizes)
        ax.set_title(f"{kind}: train-step time / float")
        ax.set_ylabel("ratio")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
