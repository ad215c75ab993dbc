"""ManiQuant WCG vs STE on the same model and data (kquant-maniquant plugin).

DoReFa k-bit weights (the paper's setting) in ``small_convnet`` (first and
last layers float), trained from the same initial weights and seed with
STE (through DoReFa's tanh normalisation), clipped STE, and WCG (latent
weights clipped to [−1, 1] as in the paper). Accuracy, loss, and the train-step
time ratio to STE, timed side by side (interleaved rounds, median). Paper
(§5 of papers.md): WCG costs ×1.035 of DoReFa per iteration.
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
    load_data,
    require,
    set_seed,
)

# the -o KEY=VALUE settings this benchmark reads (others are refused)
OPTIONS = {}


def _models(x_shape, num_classes, bits, width):
    import kquant
    from kquant_maniquant import UnitClip

    float_model = kquant.models.build("small_convnet", x_shape, num_classes, width=width)
    variants = {
        "ste": "ste",
        "clipped_ste": "clipped_ste",
        "wcg": "wcg",
    }
    models = {}
    for name, estimator in variants.items():
        # The estimator goes inside the quantizer's config: kquant.quantizers.get ignores
        # `estimator=` for dict identifiers.
        quantizer = {"name": "dorefa", "config": {"bits": bits, "estimator": estimator}}
        m = kquant.quantize_model(float_model, kernel_quantizer=quantizer, estimator=estimator,
                                  skip_first=True, skip_last=True)
        for layer in kquant.callbacks.quantized_layers(m):
            found = type(layer.kernel_quantizer.estimator)
            if found is not kquant.estimators.registry.get_class(estimator):
                raise RuntimeError(f"layer {layer.name} uses {found.__name__}, expected {estimator}")
        # Own copies of the weights: on JAX, quantize_model's assigns share the float
        # model's buffers, which the first model's fit donates (deletes).
        m.set_weights([np.array(w) for w in m.get_weights()])
        if name == "wcg":
            for layer in kquant.callbacks.quantized_layers(m):
                layer.latent_kernel.constraint = UnitClip()
        models[name] = m
    return models


def run(cfg: BenchConfig) -> Result:
    require("wcg", modules=("kquant_maniquant",))
    set_seed(cfg.seed)
    (x, y), (xt, yt) = load_data(cfg)
    num_classes = int(np.max(y)) + 1
    bits = 2
    width = 8 if cfg.tiny else 32
    epochs = cfg.epochs_or(quick=10, full=40, tiny=1)
    models = _models(x.shape[1:], num_classes, bits, width)
    rows = []
    for name, m in models.items():
        set_seed(cfg.seed)
        compile_classifier(m, keras.optimizers.Adam(1e-3))
        t0 = time.perf_counter()
        m.fit(x, y, epochs=epochs, batch_size=cfg.batch_size, verbose=0, shuffle=True)
        fit_s = time.perf_counter() - t0
        loss, acc = m.evaluate(xt, yt, verbose=0)
        rows.append({"estimator": name, "test_accuracy": float(acc), "test_loss": float(loss),
                     "fit_seconds": fit_s})
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
        columns=["estimator", "test_accuracy", "accuracy_minus_ste", "test_loss", "step_ms",
                 "step_time_ratio_to_ste", "fit_seconds"],
        meta={"model": "small_convnet (first/last float)", "weights": f"DoReFa {bits}-bit",
              "epochs": epochs, "optimizer": "Adam 1e-3",
              "paper_step_time_ratio": 18.44 / 17.81},
    )
