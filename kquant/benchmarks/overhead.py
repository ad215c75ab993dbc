"""Train-step time of quantized vs float layers: Dense and Conv2D at several sizes.

Each model is one layer (``Input → Dense`` or ``Input → Conv2D 3×3 same``)
trained with SGD on a mean-squared error, so the step time is the layer's
forward + backward + update. Variants of one size are timed interleaved in
one process (:func:`benchmarks.common.compare_step_times`) and reported as a
ratio to the float layer (six timed steps per model per turn, after three that
settle it, the median of all):

* ``float``: the Keras layer;
* ``float_control``: a second, separately built and compiled float layer of the
  same size, timed like every variant: its ratio to ``float`` is the spread of
  the measurement itself (a step time that differs only by which kernels the
  compiler or cuDNN's autotuner picked); a quantized row inside that spread is
  no slower than float;
* ``sign_w``: kquant binary weights (Sign, its default estimator);
* ``sign_wa``: binary weights and binary inputs;
* ``dorefa2_w``: DoReFa 2-bit weights (STE);
* ``uniform2_w_htge``: 2-bit uniform weights with learned step and HTGE;
* ``bwn_w``, ``twn_w``, ``bitnet_w``, ``stochastic_sign_w``: BWN, TWN, BitNet
  b1.58 and stochastic-sign weights (per tensor, default estimators);
* ``floor_pass_w``, ``floor_tanh_w``: not quantizers but the cost floors of
  :mod:`kquant.benchmarks._floors`: the kernel through ``s·W`` (one pass each
  way: the least any weight quantizer adds) and ``s·tanh W`` with its gradient
  (the transcendental DoReFa and HTGE evaluate over every weight): a
  quantizer's row is read against the floor of its formula;
* ``pact4_a``: PACT 4-bit inputs (learned clip α). α's gradient needs the
  layer's input gradient, which a first layer's float twin never computes, so
  this variant and its twin ``float_inner`` sit behind a trainable scalar input
  scale (``Input → x·s → layer``): the layer as inside a network (column
  ``twin`` names the float model each ratio is taken against).

When ``larq`` (with ``tf_keras``) is importable on the TensorFlow backend,
Larq's ``QuantDense``/``QuantConv2D`` (``ste_sign`` weights, and weights +
inputs) and a ``tf_keras`` float layer are timed alongside; otherwise the
result says so (report, not a requirement).
Options: ``variants`` (list), ``larq`` (false to skip), ``jit``: ``auto``
(Keras' default: XLA on JAX, and on TensorFlow only where it sees a GPU: a
CPU-only TensorFlow trains without it), ``on``, ``off``, or ``both``
(default on TensorFlow except at the tiny scale): every variant is then timed
with and without XLA, all interleaved in one run, each ratio against the float
layer compiled the same way (column ``jit``, the resolved ``model.jit_compile``).
"""

from __future__ import annotations

import functools
import importlib.util

import keras
import numpy as np

from kquant.benchmarks._floors import CostFloor
from kquant.benchmarks.common import (
    Result,
    compare_step_times,
    option_names,
    set_seed,
    strategy_scope,
    timing_steps,
)

# the -o KEY=VALUE settings this benchmark reads (others are refused)
OPTIONS = {
    "jit": "auto, on, off or both",
    "variants": "variants to time (list or a,b)",
    "larq": "also time Larq's layers where importable",
    "eager": "run eagerly",
    "timing_steps": "timed steps per model",
}

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
    "float_control": None,
    "sign_w": {"kernel_quantizer": "sign"},
    "sign_wa": {"kernel_quantizer": "sign", "input_quantizer": "sign"},
    "dorefa2_w": {"kernel_quantizer": {"name": "dorefa", "config": {"bits": 2, "estimator": "ste"}}},
    "uniform2_w_htge": {"kernel_quantizer": {"name": "uniform",
                                             "config": {"bits": 2, "estimator": "htge"}}},
    "bwn_w": {"kernel_quantizer": "bwn"},
    "twn_w": {"kernel_quantizer": "twn"},
    "bitnet_w": {"kernel_quantizer": "bitnet"},
    "stochastic_sign_w": {"kernel_quantizer": "stochastic_sign"},
    "floor_pass_w": {"kernel_quantizer": functools.partial(CostFloor, kind="pass")},
    "floor_tanh_w": {"kernel_quantizer": functools.partial(CostFloor, kind="tanh")},
    "pact4_a": {"input_quantizer": {"name": "pact", "config": {"bits": 4}}},
    "float_inner": None,
}

#: variants timed behind a trainable input scale (their layer needs its input gradient)
INNER = {"pact4_a", "float_inner"}

TINY_VARIANTS = ["float", "sign_wa", "uniform2_w_htge", "pact4_a", "floor_tanh_w"]  # smoke-test scale

COLUMNS = ["layer", "size", "variant", "jit", "params", "step_ms", "twin", "time_vs_float",
           "time_vs_larq"]

JIT_MODES = {"auto": ["auto"], "on": [True], "off": [False], "both": [True, False]}


def _layer(kind, size, quant):
    import kquant

    n = size[1]
    if quant is not None:  # a floor is built fresh for each layer
        quant = {key: value() if callable(value) else value for key, value in quant.items()}
    if kind == "dense":
        return keras.layers.Dense(n) if quant is None else kquant.QuantDense(n, **quant)
    if quant is None:
        return keras.layers.Conv2D(n, 3, padding="same")
    return kquant.QuantConv2D(n, 3, padding="same", **quant)


def _input_shape(kind, size):
    return (size[0],) if kind == "dense" else (size[0], size[0], size[1])


class InputScale(keras.layers.Layer):
    """``x·s`` with one trainable scalar ``s`` (1 at start): makes the next layer
    compute its input gradient, as every layer but a network's first does."""

    def build(self, input_shape):
        self.scale = self.add_weight(name="scale", shape=(), initializer="ones")

    def call(self, x):
        return x * self.scale


def twin(name) -> str:
    """The float model a variant's time is divided by."""
    return "float_inner" if name in INNER else "float"


def _model(kind, size, quant, eager, jit="auto", inner=False):
    front = [InputScale()] if inner else []
    model = keras.Sequential([keras.Input(_input_shape(kind, size)), *front,
                              _layer(kind, size, quant)])
    model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse", run_eagerly=eager,
                  jit_compile=jit if _jit_ok() else False)
    return model


def _jit_modes(cfg):
    default = "both" if keras.backend.backend() == "tensorflow" and not cfg.tiny else "auto"
    mode = str(cfg.option("jit", default))
    if mode not in JIT_MODES:
        raise ValueError(f"overhead: option `jit` takes {', '.join(JIT_MODES)}; got {mode!r}.")
    return JIT_MODES[mode] if _jit_ok() else [False]


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
    names = [*dict.fromkeys([twin(n) for n in names] + ["float", *names])]
    use_larq = bool(cfg.option("larq", True)) and larq_available()
    eager = bool(cfg.option("eager", False))
    jit_modes = _jit_modes(cfg)
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
            models = {}
            with strategy_scope(cfg):
                for jit in jit_modes:
                    models.update({(name, jit): _model(kind, size, VARIANTS[name], eager, jit,
                                                       inner=name in INNER)
                                   for name in names})
            if use_larq:
                models.update({(name, "larq"): m for name, m in _larq_models(kind, size).items()})
            steps = timing_steps(cfg)
            # short turns: on a shared machine a load change then hits every model
            times = compare_step_times(models, x, y, batch, steps=steps,
                                       warmup=1 if cfg.tiny else 3, rounds=max(1, steps // 6))
            label = f"{size[0]}→{size[1]}" if kind == "dense" else f"{size[0]}×{size[0]}×{size[1]}"
            larq_twin = {"sign_w": "larq_sign_w", "sign_wa": "larq_sign_wa", "float": "larq_float"}
            for (name, jit), model in models.items():
                reference = twin(name) if jit != "larq" else "float"
                float_key = (reference, jit if jit != "larq" else jit_modes[0])
                row = {"layer": kind, "size": label, "variant": name,
                       "jit": str(getattr(model, "jit_compile", "")), "batch": batch,
                       "params": int(model.count_params()), "step_ms": 1e3 * times[(name, jit)],
                       "twin": reference if jit != "larq" else "float (keras)",
                       "time_vs_float": times[(name, jit)] / times[float_key]}
                if name in larq_twin and (larq_twin[name], "larq") in times:
                    row["time_vs_larq"] = times[(name, jit)] / times[(larq_twin[name], "larq")]
                rows.append(row)
    meta = {
        "sizes": sizes, "optimizer": "SGD", "loss": "mse", "timing_steps": timing_steps(cfg),
        "eager": eager, "jit_compile": [str(j) for j in jit_modes],
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
        jits = list(dict.fromkeys(r.get("jit", "") for r in sel))
        variants = list(dict.fromkeys((r["variant"], r.get("jit", "")) for r in sel))
        width = 0.8 / max(len(variants), 1)
        for i, (v, j) in enumerate(variants):
            vals = [next((r["time_vs_float"] for r in sel if r["size"] == s and r["variant"] == v
                          and r.get("jit", "") == j), 0.0) for s in sizes]
            label = f"{v} (jit {j})" if len(jits) > 1 else v
            ax.bar(np.arange(len(sizes)) + i * width, vals, width, label=label)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(np.arange(len(sizes)) + 0.4 - width / 2, sizes)
        ax.set_title(f"{kind}: train-step time / float")
        ax.set_ylabel("ratio")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
