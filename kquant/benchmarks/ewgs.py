"""EWGS vs STE on the same model and data (kquant-ewgs plugin).

One architecture (float first conv, two EWGS-quantized layers with EWGS
quantizers on weights and activations and the learnable output scale, float
classifier; batch-norm momentum 0.9 so the moving statistics settle within
a short run), the same initial weights and seed, trained with: STE (δ = 0 fixed),
EWGS with fixed δ = 1e-3, and adaptive EWGS (δ refreshed by ``DeltaUpdate``
every ``k`` steps). Reports accuracy, loss, the train-step time ratio to STE
(timed side by side, interleaved rounds, median) and the δ refresh cost.
Paper (ResNet-20 CIFAR-10 W1/A1): STE 84.7 %, EWGS 85.6 %, fixed δ 1e-3 85.3 %.
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


def _model(x_shape, num_classes, bits, width, make_estimator):
    from kquant_ewgs import EWGSConv2D, EWGSQuantizer

    def quantizers(kind):
        # l, u, α at 1/100 of the weights' learning rate (paper: 1e-5 vs 1e-3).
        return EWGSQuantizer(bits, kind=kind, lr_multiplier=0.01, estimator=make_estimator())

    layers = keras.layers
    inputs = keras.Input(x_shape)
    h = layers.Conv2D(width, 3, padding="same", use_bias=False)(inputs)
    h = layers.ReLU()(layers.BatchNormalization(momentum=0.9)(h))
    for filters in (width, 2 * width):
        h = EWGSConv2D(filters, 3, padding="same", use_bias=False,
                       kernel_quantizer=quantizers("weight"), input_quantizer=quantizers("activation"),
                       output_scale_lr_multiplier=0.01)(h)
        h = layers.ReLU()(layers.BatchNormalization(momentum=0.9)(h))
        if h.shape[1] >= 4:
            h = layers.MaxPooling2D()(h)
    h = layers.Flatten()(h)
    return keras.Model(inputs, layers.Dense(num_classes)(h))


#: row label -> (initial δ, adaptive): what each row trains (checked by the plugin's tests)
VARIANTS = {
    "ste": (0.0, False),
    "ewgs_fixed_1e-3": (1e-3, False),
    "ewgs_adaptive": (0.0, True),
}


def same_start(model, start):
    """Give ``model`` the weights ``start`` (taken from the STE model) but keep its own δ.

    ``set_weights`` copies every weight, δ included (a non-trainable weight), so
    without the reset every variant would train with the STE model's δ = 0.
    """
    from kquant_ewgs import ewgs_estimators

    model.set_weights(start)
    for est in ewgs_estimators(model):
        est.delta.assign(est.delta_init)


def trained_deltas(model):
    """The distinct δ values of ``model``'s EWGS estimators (the δ the row trained with)."""
    from kquant_ewgs import ewgs_estimators

    return sorted({round(float(keras.ops.convert_to_numpy(e.delta)), 8) for e in ewgs_estimators(model)})


def run(cfg: BenchConfig) -> Result:
    require("ewgs", modules=("kquant_ewgs",))
    from kquant_ewgs import EWGS, DeltaUpdate

    set_seed(cfg.seed)
    (x, y), (xt, yt) = load_data(cfg)
    num_classes = int(np.max(y)) + 1
    bits = 2
    width = 8 if cfg.tiny else 32
    epochs = cfg.epochs_or(quick=10, full=40, tiny=1)
    steps_per_epoch = -(-len(x) // cfg.batch_size)
    every = max(1, min(10 * steps_per_epoch, (epochs * steps_per_epoch) // 4))
    # δ refresh: the authors' Hutchinson settings (≤ 50 iterations, rel. tol 1e-3, 3 batches)
    delta_settings = (dict(samples=2, num_batches=1, tol=0.0) if cfg.tiny
                      else dict(samples=50, num_batches=3, tol=1e-3))
    variants = {name: (lambda d=delta, a=adaptive: EWGS(delta=d, adaptive=a))
                for name, (delta, adaptive) in VARIANTS.items()}
    set_seed(cfg.seed)
    models = {k: _model(x.shape[1:], num_classes, bits, width, make) for k, make in variants.items()}
    start = models["ste"].get_weights()
    rows = []
    for name, m in models.items():
        same_start(m, start)
        set_seed(cfg.seed)
        compile_classifier(m, keras.optimizers.Adam(2e-3))
        callbacks = []
        if name == "ewgs_adaptive":
            callbacks.append(DeltaUpdate(x, y, every=every, batch_size=min(64, len(x)),
                                         seed=cfg.seed, **delta_settings))
        t0 = time.perf_counter()
        m.fit(x, y, epochs=epochs, batch_size=cfg.batch_size, verbose=0, shuffle=True,
              callbacks=callbacks)
        fit_s = time.perf_counter() - t0
        loss, acc = m.evaluate(xt, yt, verbose=0)
        row = {"estimator": name, "test_accuracy": float(acc), "test_loss": float(loss),
               "fit_seconds": fit_s, "delta_trained": trained_deltas(m),
               "weights_distance_to_ste": distance_to(m, models["ste"])}  # "ste" trains first
        if callbacks:
            cb = callbacks[0]
            t0 = time.perf_counter()
            deltas = cb.refresh()
            row["delta_refresh_seconds"] = time.perf_counter() - t0
            row["delta_refreshes"] = len(cb.history)
            row["mean_delta"] = float(np.mean(list(deltas.values()))) if deltas else 0.0
        rows.append(row)
    times = compare_step_times(models, x, y, cfg.batch_size,
                               steps=6 if cfg.tiny else 50, rounds=2 if cfg.tiny else 5)
    for row in rows:
        row["step_ms"] = 1e3 * times[row["estimator"]]
        row["step_time_ratio_to_ste"] = times[row["estimator"]] / times["ste"]
        row["accuracy_minus_ste"] = row["test_accuracy"] - rows[0]["test_accuracy"]
    return Result(
        name="ewgs",
        rows=rows,
        plot=accuracy_and_time_plot(rows, "estimator"),
        columns=["estimator", "delta_trained", "weights_distance_to_ste", "test_accuracy",
                 "accuracy_minus_ste", "test_loss", "step_ms",
                 "step_time_ratio_to_ste", "fit_seconds", "delta_refreshes", "mean_delta",
                 "delta_refresh_seconds"],
        meta={"model": "conv(float) + 2×EWGSConv2D W2/A2 + dense(float)", "bits": bits,
              "epochs": epochs, "delta_every_steps": every, "optimizer": "Adam 2e-3",
              "delta_refresh": delta_settings,
              "note": "step time excludes δ refreshes; their cost is delta_refresh_seconds "
                      "once per delta_every_steps steps"},
    )
