"""ALQ benchmark: accuracy vs average bitwidth / compression, and step-time ratios.

LeNet5 (MNIST via tfds, or the embedded 8×8 digits offline): a float net is
trained with Adam to convergence at its scale, converted by structured
sketching (kernel-wise convs, channel-wise dense, as the authors' LeNet5
setup), then the ALQ pipeline (Alg. 5) prunes round by round with the paper's
smooth schedule (``ratio`` 0.6 per round on LeNet5, as many rounds as it takes
to reach ``target_bits``); one row per round. The train-step time of the bases
step (I_max 2, 4, 6, 8, with the default ``search="auto"``; the row names the
search it runs, :func:`kquant.alq.steps.resolve_search`) and of the
coordinates step (I_max 6) is measured as a ratio to an Adam step on the
float model, all interleaved in one process
(:func:`~kquant.benchmarks.common.compare_step_times`), without and with XLA,
and so is its memory: the peak a settled step allocates (``peak_mib``,
:func:`~kquant.benchmarks.common.step_peak_bytes`: TensorFlow's allocator
statistics; on JAX the temporaries XLA assigns to the compiled step; torch: none),
beyond the Adam step's (``peak_minus_adam_mib``), beside what
one ``[G, n, 2^I]`` float32 distance tensor would hold (``distance_tensor_mib``,
the authors' search, which ours never builds).

Options: ``-o timing=false`` skips the timing rows; ``-o train=false`` gives
only them (on the untrained float LeNet5: a step's time does not depend on
the weights).
"""

from __future__ import annotations

import keras
from keras import layers

from kquant import models
from kquant.alq import ALQ, ALQSchedule, alq_layers, average_bitwidth, fit_pipeline, quantize
from kquant.alq import steps, storage_table
from kquant.alq.storage import plot_bitwidths
from kquant.benchmarks.common import (BenchConfig, Result, compare_step_times, compile_classifier,
                                      jit_compile_allowed, load_data, set_seed, step_peak_bytes,
                                      timing_steps)

MIB = 2.0**20

# the -o KEY=VALUE settings this benchmark reads (others are refused)
OPTIONS = {
    "train": "train the ALQ rows (false: timing only)",
    "timing": "time the bases step against Adam (false: skip)",
    "timing_steps": "timed steps per model",
}


TIMING_COLUMNS = ["bases_step_vs_adam", "coordinates_step_vs_adam", "peak_mib",
                  "peak_minus_adam_mib", "distance_tensor_mib"]


def _groups(layer):
    return "kernel" if isinstance(layer, layers.Conv2D) else "channel"


def settings(cfg: BenchConfig) -> dict:
    """The hyper-parameters of each scale (what the rows are labelled with)."""
    if cfg.tiny:
        return dict(float_epochs=cfg.epochs_or(1, 1, 1), max_bits=3, ratio=0.6, target_bits=None,
                    rounds=1, prune_epochs=1, bases_epochs=1, coordinates_epochs=1,
                    bases_lr=1e-3, coordinates_lr=1e-3, decay=0.1, timing_bits=(2,),
                    jit=(False, True) if keras.backend.backend() == "jax" else (False,))
    if cfg.quick:  # 8×8 digits on a CPU in minutes
        return dict(float_epochs=cfg.epochs_or(40, 40), max_bits=6, ratio=0.6, target_bits=0.7,
                    rounds=None, prune_epochs=1, bases_epochs=2, coordinates_epochs=4,
                    bases_lr=1e-3, coordinates_lr=1e-3, decay=0.1, timing_bits=(2, 4, 6, 8),
                    jit=(False, True))
    # The paper's LeNet5 (App. B.2): 10 bases + 20 coordinates epochs per round, 0.40 bits.
    return dict(float_epochs=cfg.epochs_or(30, 30), max_bits=6, ratio=0.6, target_bits=0.4,
                rounds=None, prune_epochs=1, bases_epochs=10, coordinates_epochs=20,
                bases_lr=1e-3, coordinates_lr=1e-4, decay=0.1, timing_bits=(2, 4, 6, 8),
                jit=(False, True))


def _search_run(bits, jit, strategy):
    """The bases search ``search="auto"`` runs in a train step (XLA-compiled or not):
    ALQ compiles its layer step with XLA on TensorFlow outside ``tf.distribute``
    (:func:`kquant.xla.compile_with_xla`)."""
    backend = keras.backend.backend()
    xla = jit or backend == "jax" or (backend == "tensorflow" and strategy != "mirrored")
    return "exhaustive" if xla or bits <= steps.EXHAUSTIVE_MAX_BITS else "sorted"


def _timing_rows(float_model, x, y, cfg, s):
    rows = []
    for jit in s["jit"]:
        if (jit and not jit_compile_allowed()) or (not jit and keras.backend.backend() == "jax"):
            continue  # MirroredStrategy: no XLA; JAX: always XLA (un-jitted is a debug mode)
        adam = models.build("lenet5", x.shape[1:], int(y.max()) + 1)
        adam.set_weights(float_model.get_weights())
        compile_classifier(adam, keras.optimizers.Adam(1e-3), jit_compile=jit)
        timed = {"adam": adam}
        variants = [(b, "bases") for b in s["timing_bits"]]
        variants.append((min(6, max(s["timing_bits"])), "coordinates"))
        for bits, phase in variants:
            model = quantize(float_model, group=_groups, max_bits=bits)
            compile_classifier(model, ALQ(1e-3, phase=phase), jit_compile=jit)
            timed[(bits, phase)] = model
        seconds = compare_step_times(timed, x, y, cfg.batch_size, steps=timing_steps(cfg))
        peak = {k: step_peak_bytes(m, x, y, cfg.batch_size) for k, m in timed.items()}
        xla = " XLA" if jit else ""
        if peak["adam"] is not None:
            rows.append({"stage": f"timing Adam (reference){xla}", "peak_mib": peak["adam"] / MIB})
        for (bits, phase), t in ((k, v) for k, v in seconds.items() if k != "adam"):
            search = f" ({_search_run(bits, jit, cfg.strategy)})" if phase == "bases" else ""
            row = {"stage": f"timing {phase} I_max={bits}{search}{xla}",
                   f"{phase}_step_vs_adam": t / seconds["adam"]}
            if peak["adam"] is not None:
                row["peak_mib"] = peak[(bits, phase)] / MIB
                row["peak_minus_adam_mib"] = (peak[(bits, phase)] - peak["adam"]) / MIB
                if phase == "bases":  # what a [G, n, 2^I] float32 distance tensor would hold
                    weights = storage_table(timed[(bits, phase)])[-1]["weights"]
                    row["distance_tensor_mib"] = weights * 2**bits * 4 / MIB
            rows.append(row)
    return rows


def run(cfg: BenchConfig) -> Result:
    set_seed(cfg.seed)
    s = settings(cfg)
    (x, y), (xt, yt) = load_data(cfg)
    num_classes = int(max(y.max(), yt.max())) + 1
    float_model = models.build("lenet5", x.shape[1:], num_classes)
    compile_classifier(float_model, keras.optimizers.Adam(1e-3))
    if not cfg.option("train", True):
        return Result(name="alq", rows=_timing_rows(float_model, x, y, cfg, s),
                      meta={"settings": {k: (list(v) if isinstance(v, tuple) else v)
                                         for k, v in s.items()}, "timing_only": True},
                      columns=["stage", *TIMING_COLUMNS])
    history = float_model.fit(x, y, epochs=s["float_epochs"], batch_size=cfg.batch_size, verbose=0,
                              validation_data=(xt, yt))
    float_acc = float(float_model.evaluate(xt, yt, verbose=0)[1])

    alq_model = quantize(float_model, group=_groups, max_bits=s["max_bits"])
    rows = [{"stage": "float", "accuracy": float_acc, "average_bits": 32.0, "compression": 1.0}]
    init = storage_table(alq_model)[-1]
    compile_classifier(alq_model, ALQ(s["bases_lr"]))
    rows.append({"stage": "sketch init", "accuracy": float(alq_model.evaluate(xt, yt, verbose=0)[1]),
                 "average_bits": init["average_bits"], "compression": init["compression"]})
    rounds = s["rounds"] or ALQSchedule.rounds_needed(init["average_bits"], s["target_bits"],
                                                      s["ratio"])
    _, schedule = fit_pipeline(
        alq_model, x, y, batch_size=cfg.batch_size, validation_data=(xt, yt), verbose=0,
        rounds=rounds, prune_epochs=s["prune_epochs"], bases_epochs=s["bases_epochs"],
        coordinates_epochs=s["coordinates_epochs"], bases_lr=s["bases_lr"],
        coordinates_lr=s["coordinates_lr"], decay=s["decay"], ratio=s["ratio"],
        target_bits=s["target_bits"],
    )
    for r in range(1, rounds + 1):
        last = [row for row in schedule.log if row["round"] == r][-1]
        rows.append({"stage": f"round {r}", "accuracy": last.get("val_accuracy", float("nan")),
                     "average_bits": last["average_bits"]})
    final_table = storage_table(alq_model)
    rows[-1]["compression"] = final_table[-1]["compression"]
    rows[-1]["storage_kb"] = final_table[-1]["storage_kb"]

    if cfg.option("timing", True):
        rows += _timing_rows(float_model, x, y, cfg, s)

    def plot(path):
        plot_bitwidths(final_table, path, title="ALQ LeNet5: average bitwidth per layer")

    settings_run = {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.items()}
    settings_run["rounds"] = rounds
    return Result(
        name="alq",
        rows=rows,
        meta={"settings": settings_run, "float_epochs_trained": len(history.epoch),
              "float_history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
              "alq_epochs_trained": len(schedule.log), "planned_alq_epochs": schedule.total_epochs,
              "final_average_bits": average_bitwidth(alq_layers(alq_model)),
              "per_layer": final_table, "phase_log": schedule.log},
        plot=plot,
        columns=["stage", "accuracy", "average_bits", "compression", "storage_kb",
                 *TIMING_COLUMNS],
    )
