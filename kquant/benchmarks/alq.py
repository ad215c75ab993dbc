"""ALQ benchmark: accuracy vs average bitwidth / compression, and step-time ratios.

LeNet5 (MNIST via tfds, or the embedded 8×8 digits offline): a float net is
trained with Adam, converted by structured sketching (kernel-wise convs,
channel-wise dense, as the authors' LeNet5 setup), then the ALQ pipeline
(Alg. 5) prunes round by round; one row per round. The train-step time of
the bases step and of the coordinates step is measured as a ratio to an Adam
step on the float model, side by side in the same run, for I_max = 1…8.
"""

from __future__ import annotations

import keras
from keras import layers

from kquant.benchmarks.common import BenchConfig, Result, compile_classifier, load_data, set_seed, step_time
from kquant import models
from kquant.alq import ALQ, alq_layers, average_bitwidth, fit_pipeline, quantize, storage_table
from kquant.alq.storage import plot_bitwidths


def _groups(layer):
    return "kernel" if isinstance(layer, layers.Conv2D) else "channel"


def run(cfg: BenchConfig) -> Result:
    set_seed(cfg.seed)
    (x, y), (xt, yt) = load_data(cfg)
    num_classes = int(max(y.max(), yt.max())) + 1
    float_model = models.build("lenet5", x.shape[1:], num_classes)
    compile_classifier(float_model, keras.optimizers.Adam(1e-3))
    float_model.fit(x, y, epochs=cfg.epochs_or(3, 10, 1), batch_size=cfg.batch_size, verbose=0)
    float_acc = float(float_model.evaluate(xt, yt, verbose=0)[1])

    max_bits = 3 if cfg.tiny else 6
    alq_model = quantize(float_model, group=_groups, max_bits=max_bits)
    rows = [{"stage": "float", "accuracy": float_acc, "average_bits": 32.0, "compression": 1.0}]
    init = storage_table(alq_model)[-1]
    compile_classifier(alq_model, ALQ(1e-3))
    rows.append({"stage": "sketch init", "accuracy": float(alq_model.evaluate(xt, yt, verbose=0)[1]),
                 "average_bits": init["average_bits"], "compression": init["compression"]})
    rounds = 1 if cfg.tiny else (3 if cfg.quick else 4)
    e = 1 if cfg.tiny or cfg.quick else None
    _, schedule = fit_pipeline(
        alq_model, x, y, batch_size=cfg.batch_size, validation_data=(xt, yt), verbose=0,
        rounds=rounds, prune_epochs=1, bases_epochs=e or 10, coordinates_epochs=(e or 10) * 2,
        bases_lr=1e-3, coordinates_lr=1e-4 if e is None else 1e-3, ratio=0.6,
        target_bits=None if cfg.tiny else 0.7,
    )
    for r in range(1, rounds + 1):
        last = [row for row in schedule.log if row["round"] == r][-1]
        rows.append({"stage": f"round {r}", "accuracy": last.get("val_accuracy", float("nan")),
                     "average_bits": last["average_bits"]})
    final_table = storage_table(alq_model)
    rows[-1]["compression"] = final_table[-1]["compression"]
    rows[-1]["storage_kb"] = final_table[-1]["storage_kb"]

    # Step times: ratios to Adam on the same (float) model, measured side by side.
    steps = 3 if cfg.tiny else 10
    adam_time = step_time(float_model, x, y, cfg.batch_size, steps=steps)
    for bits in (range(1, 4) if cfg.tiny else range(1, 9)):
        timed = quantize(float_model, group=_groups, max_bits=bits)
        optimizer = ALQ(1e-3)
        compile_classifier(timed, optimizer)
        row = {"stage": f"timing I_max={bits}", "average_bits": average_bitwidth(alq_layers(timed))}
        for phase in ("bases", "coordinates"):
            optimizer.phase = phase
            row[f"{phase}_step_vs_adam"] = step_time(timed, x, y, cfg.batch_size, steps=steps) \
                / adam_time
        rows.append(row)

    def plot(path):
        plot_bitwidths(final_table, path, title="ALQ LeNet5: average bitwidth per layer")

    return Result(
        name="alq",
        rows=rows,
        meta={"adam_step_seconds": adam_time, "max_bits": max_bits, "rounds": rounds,
              "per_layer": final_table, "phase_log": schedule.log},
        plot=plot,
        columns=["stage", "accuracy", "average_bits", "compression", "storage_kb",
                 "bases_step_vs_adam", "coordinates_step_vs_adam"],
    )
