"""Every installed gradient estimator on one model, data set and quantizer.

All nets start from the same float initial weights, see the same batches in
the same order (fixed seed) and differ only in the estimator of their
quantizers (``kquant.estimators.available()``: built-ins and plugins). Rows:
the float twin, then each estimator with test/train accuracy and loss, and
the train-step time as a ratio to the float twin and to STE, all timed
interleaved in this one process (:func:`benchmarks.common.compare_step_times`).
Plugin estimators train the way their paper does (:func:`_training_recipe`:
MetaQuant's late weight update, EWGS's δ refresh), since a plain ``fit``
reduces them to STE.

Defaults: 2-bit DoReFa weights (the quantizer every installed estimator
supports, MetaQuant's included) on every conv/dense layer but the float
classifier (as EWGS and MetaQuant do), float activations, Adam; the model is ``small_convnet`` (batch-normalised, so the
unscaled ±1 DoReFa levels train) on the 8×8 digits and Chollet's convnet on
the tensorflow-datasets sets.
Options (``-o KEY=VALUE``): ``model``, ``quantizer`` (dorefa, uniform, sign,
bwn), ``bits``, ``estimators`` (list of names), ``optimizer`` (adam, sgd),
``lr``, ``skip_last`` (true), ``meta_lr``, ``ewgs_every``, ``timing_steps``,
``eager``. The tiny (smoke-test) scale runs STE
and one estimator per plugin package (eagerly on TensorFlow).
"""

from __future__ import annotations

import traceback

import keras
import numpy as np

import kquant
from kquant.benchmarks.common import (
    Result,
    TrainingProgress,
    compare_step_times,
    iter_estimators,
    compile_classifier,
    load_data,
    option_names,
    set_seed,
    strategy_scope,
    timing_steps,
)

# the -o KEY=VALUE settings this benchmark reads (others are refused)
OPTIONS = {
    "model": "network: small_convnet or chollet",
    "quantizer": "kernel quantizer name",
    "bits": "kernel bits",
    "optimizer": "adam or sgd",
    "lr": "learning rate",
    "meta_lr": "MetaQuant meta-network learning rate",
    "ewgs_every": "EWGS δ refresh period (iterations)",
    "skip_last": "keep the last layer float",
    "eager": "run eagerly",
    "estimators": "estimators to train (list or a,b)",
    "timing_steps": "timed steps per model",
}

COLUMNS = ["estimator", "package", "training", "test_acc", "test_loss", "train_acc", "train_loss",
           "loss_before", "acc_vs_ste", "step_ms", "time_vs_float", "time_vs_ste", "status"]


def _quantizer_config(name, bits, estimator):
    config = {"estimator": estimator}
    if name in ("dorefa", "uniform"):
        config["bits"] = bits
    return {"name": name, "config": config}


def _tiny_selection(installed, packages):
    """Smoke-test scale: STE and the first estimator of every plugin package."""
    chosen = [n for n in ("ste",) if n in installed]
    seen = {"kquant"}
    for name in installed:
        if packages[name] not in seen:
            seen.add(packages[name])
            chosen.append(name)
    return chosen


def _build(model_name, input_shape):
    """The float model, batch-norm momentum 0.9 so moving statistics settle in a short run."""
    model = kquant.models.build(model_name, input_shape, 10)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    return model


def _estimator_config(name, cfg):
    """Estimator settings: the defaults, but a small MetaQuant meta network at tiny scale."""
    cls = kquant.estimators.registry.get_class(name)
    if cfg.tiny and hasattr(cls, "meta_spec"):
        return {"hidden": 8}
    return {}


def _optimizer(name, lr):
    if name == "adam":
        return keras.optimizers.Adam(lr)
    if name == "sgd":
        return keras.optimizers.SGD(lr, momentum=0.9)
    raise ValueError(f"estimators: option `optimizer` must be 'adam' or 'sgd', got {name!r}.")


def _training_recipe(model, cfg, x, y):
    """``(model to train, extra callbacks, description)``: what the estimator's paper trains with.

    A plain ``fit`` reduces some plugin estimators to STE, so they get their
    plugin's own procedure: MetaQuant estimators train inside
    ``kquant_metaquant.MetaQuant`` (the late weight update that trains the meta
    network), adaptive EWGS gets ``kquant_ewgs.DeltaUpdate`` (δ refreshed every
    10 steps, as on CIFAR-10); EDE's schedule is :class:`TrainingProgress`.
    """
    found = list(iter_estimators(model))
    if any(hasattr(e, "meta_spec") for e in found):
        import kquant_metaquant

        meta_lr = float(cfg.option("meta_lr", 1e-3))
        return (kquant_metaquant.MetaQuant(model, meta_learning_rate=meta_lr), [],
                f"MetaQuant late weight update (meta lr {meta_lr:g})")
    if any(hasattr(e, "set_delta") and getattr(e, "adaptive", False) for e in found):
        from kquant_ewgs import DeltaUpdate

        every = int(cfg.option("ewgs_every", 10))
        samples = 2 if cfg.tiny else 8
        update = DeltaUpdate(x, y, every=every, batch_size=min(64, len(x)), samples=samples,
                             num_batches=1, tol=0.0, seed=cfg.seed)
        return model, [update], (f"fit + DeltaUpdate every {every} steps ({samples} probes "
                                 "per quantizer, 1 batch)")
    if any(hasattr(e, "set_progress") for e in found):
        return model, [], "fit + schedule by epoch"
    return model, [], "fit"


def _train(model, cfg, data, epochs, optimizer, lr, callbacks=()):
    """Compile, record the initial test loss, train with a fixed seed, evaluate."""
    (x, y), (xt, yt) = data
    # tiny (smoke-test) scale on TF: eager, skipping a graph trace per net and phase
    eager = cfg.tiny and keras.backend.backend() == "tensorflow"
    compile_classifier(model, _optimizer(optimizer, lr), run_eagerly=bool(cfg.option("eager", eager)))
    loss_before, _ = model.evaluate(xt, yt, batch_size=cfg.batch_size, verbose=0)
    set_seed(cfg.seed + 1)  # the same shuffling for every net
    history = model.fit(x, y, batch_size=cfg.batch_size, epochs=epochs, shuffle=True, verbose=0,
                        callbacks=[TrainingProgress(epochs), *callbacks])
    test_loss, test_acc = model.evaluate(xt, yt, batch_size=cfg.batch_size, verbose=0)
    return {
        "test_acc": float(test_acc),
        "test_loss": float(test_loss),
        "train_acc": float(history.history["accuracy"][-1]),
        "train_loss": float(history.history["loss"][-1]),
        "loss_before": float(loss_before),
    }


def run(cfg):
    data = load_data(cfg)
    (x, y), _ = data
    model_name = cfg.option("model", "small_convnet" if cfg.dataset == "digits" else "chollet")
    qname = cfg.option("quantizer", "dorefa")
    bits = int(cfg.option("bits", 2))
    optimizer = cfg.option("optimizer", "adam")
    lr = float(cfg.option("lr", 1e-3))
    skip_last = bool(cfg.option("skip_last", True))
    epochs = cfg.epochs_or(quick=8, full=12, tiny=2)
    registry = kquant.estimators.registry
    installed = registry.names()
    packages = {p.name: p.package if p.package != "?" else p.cls.__module__.split(".")[0]
                for p in registry.info()}
    names = option_names(cfg, "estimators", _tiny_selection(installed, packages) if cfg.tiny else installed,
                         installed, "estimators")
    if "ste" not in names:
        names = ["ste", *names]  # the reference of the time ratios

    set_seed(cfg.seed)
    with strategy_scope(cfg):
        float_model = _build(model_name, x.shape[1:])
    init_weights = float_model.get_weights()

    rows, models = [], {}
    metrics = _train(float_model, cfg, data, epochs, optimizer, lr)
    rows.append({"estimator": "float", "package": "keras", "training": "fit", **metrics,
                 "status": "ok"})
    models["float"] = float_model

    for name in names:
        row = {"estimator": name, "package": packages.get(name, "?")}
        try:
            set_seed(cfg.seed)
            with strategy_scope(cfg):
                base = _build(model_name, x.shape[1:])
                base.set_weights(init_weights)
                estimator = {"name": name, "config": _estimator_config(name, cfg)}
                model = kquant.quantize_model(
                    base, kernel_quantizer=_quantizer_config(qname, bits, estimator),
                    input_quantizer=None, skip_last=skip_last)
                model, callbacks, row["training"] = _training_recipe(model, cfg, x, y)
            row.update(_train(model, cfg, data, epochs, optimizer, lr, callbacks))
            row["status"] = "ok"
            models[name] = model
        except NotImplementedError as e:  # e.g. MetaQuant on the torch backend
            row["status"] = f"unsupported: {str(e).splitlines()[0][:160]}"
        except Exception as e:  # a plugin that cannot train this setup is reported, not fatal
            row["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
            row["traceback"] = traceback.format_exc(limit=3)
        rows.append(row)

    times = compare_step_times(models, x, y, cfg.batch_size, steps=timing_steps(cfg),
                               warmup=1 if cfg.tiny else 3)
    ste_acc = next((r["test_acc"] for r in rows if r["estimator"] == "ste" and "test_acc" in r), None)
    for row in rows:
        name = row["estimator"]
        if name in times:
            row["step_ms"] = 1e3 * times[name]
            row["time_vs_float"] = times[name] / times["float"]
            if "ste" in times:
                row["time_vs_ste"] = times[name] / times["ste"]
        if ste_acc is not None and "test_acc" in row and name != "float":
            row["acc_vs_ste"] = row["test_acc"] - ste_acc

    meta = {
        "model": model_name, "quantizer": qname, "bits": bits, "optimizer": optimizer, "lr": lr,
        "epochs": epochs, "train_examples": int(len(x)), "timing_steps": timing_steps(cfg),
        "activations": "float", "batchnorm_momentum": 0.9,
        "quantized_layers": "every Conv2D/Dense" + (" but the classifier (kept float)" if skip_last else ""),
        "timing": "train steps only: EWGS δ refreshes (DeltaUpdate) are not in step_ms",
        "failed": {r["estimator"]: r.get("traceback", "") for r in rows if r["status"] != "ok"},
    }
    for row in rows:
        row.pop("traceback", None)
    return Result("estimators", rows, meta=meta, plot=lambda path: _plot(rows, path), columns=COLUMNS)


def _plot(rows, path):
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok" and "step_ms" in r]
    labels = [r["estimator"] for r in ok]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 0.9 * len(ok) + 4), 4))
    pos = np.arange(len(ok))
    ax1.bar(pos, [100 * r["test_acc"] for r in ok], color="tab:blue")
    accs = [100 * r["test_acc"] for r in ok]
    ax1.set_ylim(max(0.0, min(accs) - 5.0), min(100.0, max(accs) + 1.0))
    ax1.set_ylabel("test accuracy (%)")
    ax1.set_title("accuracy")
    ax2.bar(pos, [r["time_vs_float"] for r in ok], color="tab:orange")
    ax2.axhline(1.0, color="k", lw=0.8)
    ax2.set_ylabel("train-step time / float")
    ax2.set_title("step time")
    for ax in (ax1, ax2):
        ax.set_xticks(pos, labels, rotation=45, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
