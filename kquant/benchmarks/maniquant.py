"""ManiQuant WCG vs STE on the same model and data (kquant-maniquant plugin).

DoReFa k-bit weights (the paper's setting) in ``small_convnet`` (first and
last layers float), trained from the same initial weights and seed, with Adam:

* ``ste``: DoReFa's STE, through its ``tanh``/max normalisation (the paper's
  DoReFa baseline);
* ``wcg_chi0``: WCG with ``χ = 0``: the gradient straight from ``Ŵ`` to the
  latent ``W``, gated by ``1{|W| ≤ 1}``, latents kept in ``[−1, 1]``
  (:class:`~kquant_maniquant.UnitClip`): everything WCG does but its
  weak-curvature term, so ``wcg − wcg_chi0`` is that term's effect;
* ``wcg``: WCG (``χ = 1/out_channels``, latents in ``[−1, 1]`` as in the paper).

(A clipped STE would equal ``ste`` here: DoReFa's normalised weight never leaves
the representable range, so its clip never binds.) Accuracy, loss, and the
train-step time ratio to STE, timed side by side (interleaved rounds, median).
Paper (§5 of papers.md): WCG costs ×1.035 of DoReFa per iteration.
"""

from __future__ import annotations

import time

import keras
import numpy as np

from kquant.benchmarks.common import (
    BenchConfig,
    Result,
    accuracy_and_time_plot,
    compare_step_times,
    compile_classifier,
    distance_to,
    load_data,
    require,
    set_seed,
)

# the -o KEY=VALUE settings this benchmark reads (others are refused)
OPTIONS = {}


#: row: (estimator, its config, latent weights kept in [−1, 1])
VARIANTS = {
    "ste": ("ste", {}, False),
    "wcg_chi0": ("wcg", {"chi": 0.0}, True),
    "wcg": ("wcg", {}, True),
}


def _models(x_shape, num_classes, bits, width):
    import kquant
    from kquant_maniquant import UnitClip

    float_model = kquant.models.build("small_convnet", x_shape, num_classes, width=width)
    models = {}
    for name, (estimator, config, unit_box) in VARIANTS.items():
        # The estimator goes inside the quantizer's config: kquant.quantizers.get ignores
        # `estimator=` for dict identifiers.
        spec = {"name": estimator, "config": config}
        quantizer = {"name": "dorefa", "config": {"bits": bits, "estimator": spec}}
        m = kquant.quantize_model(float_model, kernel_quantizer=quantizer,
                                  skip_first=True, skip_last=True)
        # Own copies of the weights: on JAX, quantize_model's assigns share the float
        # model's buffers, which the first model's fit donates (deletes).
        m.set_weights([np.array(w) for w in m.get_weights()])
        if unit_box:
            for layer in kquant.callbacks.quantized_layers(m):
                layer.latent_kernel.constraint = UnitClip()
        models[name] = m
    return models


def trained_config(model) -> dict:
    """What a trained row ran, read back from its layers: each quantized kernel's
    quantizer and estimator (with χ for WCG), its constraint, and the largest latent
    weight after training."""
    import kquant

    layers = kquant.callbacks.quantized_layers(model)
    kernels = [np.asarray(keras.ops.convert_to_numpy(layer.latent_kernel)) for layer in layers]
    return {
        "quantizers": sorted({f"{type(l.kernel_quantizer).__name__}-{l.kernel_quantizer.precision}"
                              for l in layers}),
        "estimators": sorted({type(l.kernel_quantizer.estimator).__name__ for l in layers}),
        "chi": sorted({getattr(l.kernel_quantizer.estimator, "chi_for", lambda s: None)(
            tuple(l.latent_kernel.shape)) for l in layers}, key=str),
        "constraints": sorted({type(l.latent_kernel.constraint).__name__ for l in layers}),
        "max_abs_latent": float(max(np.abs(k).max() for k in kernels)),
        "float_layers": [l.name for l in model.layers if l not in layers and l.weights],
    }


def run(cfg: BenchConfig) -> Result:
    require("wcg", modules=("kquant_maniquant",))
    set_seed(cfg.seed)
    (x, y), (xt, yt) = load_data(cfg)
    num_classes = int(np.max(y)) + 1
    bits = 2
    width = 8 if cfg.tiny else 32
    epochs = cfg.epochs_or(quick=10, full=40, tiny=1)
    models = _models(x.shape[1:], num_classes, bits, width)
    rows, trained = [], {}
    for name, m in models.items():
        set_seed(cfg.seed)
        compile_classifier(m, keras.optimizers.Adam(1e-3))
        t0 = time.perf_counter()
        m.fit(x, y, epochs=epochs, batch_size=cfg.batch_size, verbose=0, shuffle=True)
        fit_s = time.perf_counter() - t0
        loss, acc = m.evaluate(xt, yt, verbose=0)
        rows.append({"estimator": name, "test_accuracy": float(acc), "test_loss": float(loss),
                     "fit_seconds": fit_s,   # "ste" trains first
                     "weights_distance_to_ste": distance_to(m, models["ste"])})
        trained[name] = trained_config(m)
    times = compare_step_times(models, x, y, cfg.batch_size,
                               steps=6 if cfg.tiny else 50, rounds=2 if cfg.tiny else 5)
    for row in rows:
        row["step_ms"] = 1e3 * times[row["estimator"]]
        row["step_time_ratio_to_ste"] = times[row["estimator"]] / times["ste"]
        row["accuracy_minus_ste"] = row["test_accuracy"] - rows[0]["test_accuracy"]
    return Result(
        name="maniquant",
        rows=rows,
        plot=accuracy_and_time_plot(rows, "estimator"),
        columns=["estimator", "weights_distance_to_ste", "test_accuracy", "accuracy_minus_ste",
                 "test_loss", "step_ms",
                 "step_time_ratio_to_ste", "fit_seconds"],
        meta={"model": "small_convnet (first/last float)", "weights": f"DoReFa {bits}-bit",
              "variants": {name: {"estimator": est, "config": config, "unit_clip": box}
                           for name, (est, config, box) in VARIANTS.items()},
              "trained": trained, "epochs": epochs, "optimizer": "Adam 1e-3",
              "paper_step_time_ratio": 18.44 / 17.81},
    )
