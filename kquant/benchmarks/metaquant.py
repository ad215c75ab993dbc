"""MetaQuant (FCGrad, MultiFC, LSTMFC) against STE, for DoReFa/BWN × SGD/Adam.

Needs the ``kquant-metaquant`` plugin (``pip install ./plugins/kquant-metaquant``).
For every forward quantizer (``dorefa`` k-bit, ``bwn``) and base optimizer
(``sgd`` with momentum 0.9, ``adam``) one float net is built once; every
variant starts from its weights (all layers quantized, as in the paper), sees
the same batches and differs only in the backward rule: ``ste`` trains with
the plain Keras train step, the MetaQuant variants with
:class:`kquant_metaquant.MetaQuant` (shared meta network, late weight update,
meta Adam lr 1e-3). The train-step time of each variant is measured
interleaved with its STE twin in this one process (paper: MultiFC ×1.34 per
iteration over DoReFa+STE on ResNet). ``meta_net_ms`` is the meta network's own
forward and ``∂/∂φ`` on the model's meta coordinates, timed alone (XLA), and
``floor_vs_ste`` = (STE step + that) / STE step: the least a step can cost (LSTMFC's
``[n, h]·[h, 4h]`` products dominate it). For LSTMFC, ``products_ms`` times those two
products alone, the fastest of XLA, the backend's own matmul and NumPy's BLAS
(:func:`kquant_metaquant.cost.products_seconds`), and ``products_floor_vs_ste`` =
(STE step + that) / STE step: the float32 arithmetic's own floor on this machine,
whatever the implementation of the rest.

Options (``-o KEY=VALUE``): ``model`` (default ``small_convnet``),
``quantizers`` (``dorefa,bwn``), ``optimizers`` (``sgd,adam``), ``variants``
(``fcgrad,fcgrad_identity,multifc,multifc_bias,lstmfc``; ``multifc_bias`` is
MultiFC with FC biases, ``use_bias=True``; ``fcgrad_identity`` FCGrad with
``init="identity"``), ``bits`` (1), ``hidden`` (100), ``lr`` (1e-3),
``meta_lr`` (1e-3), ``jit`` (``on``: every variant, STE included, compiles with
XLA, so the times compare one compilation mode; ``auto``: each as a user's
default compile does, MetaQuant's LSTMFC with XLA and the rest Keras' choice; not
under ``MirroredStrategy``), ``timing_steps``. Without ``lr`` each (quantizer, optimizer)
cell trains at :data:`LEARNING_RATES` (else 1e-3); the ``lr`` column is read back
from each trained optimizer. The tiny scale runs DoReFa × Adam with
STE and MultiFC (hidden 16) for one epoch on 256 digits.
"""

from __future__ import annotations

import keras
import numpy as np

import kquant
from kquant.benchmarks.common import (
    Result,
    compare_step_times,
    compile_classifier,
    jit_compile_allowed,
    load_data,
    require,
    set_seed,
    timing_steps,
)

# the -o KEY=VALUE settings this benchmark reads (others are refused)
OPTIONS = {
    "model": "network",
    "quantizers": "kernel quantizers (list or a,b)",
    "optimizers": "optimizers (list or a,b)",
    "variants": "meta-network variants (list or a,b)",
    "bits": "kernel bits",
    "hidden": "meta-network hidden size",
    "lr": "learning rate (else the table's)",
    "meta_lr": "meta-network learning rate",
    "eager": "run eagerly",
    "jit": "XLA for every variant: on (default), off or auto (Keras')",
    "timing_steps": "timed steps per model",
}

JIT_MODES = {"on": True, "off": False, "auto": "auto"}

#: Learning rate per (quantizer, optimizer) where the STE baseline needs another than
#: the default 1e-3 to train at the quick scale (8 epochs of digits): BWN + SGD reached
#: 0.34 test accuracy at 1e-3 and 0.82 at 1e-2 (0.67 after 40 epochs at 1e-3). Every
#: variant of a cell trains at the cell's rate; ``-o lr=...`` sets one rate for all.
LEARNING_RATES = {("bwn", "sgd"): 1e-2}

COLUMNS = ["quantizer", "optimizer", "variant", "meta_network", "jit", "lr", "test_acc",
           "train_loss", "acc_vs_ste", "step_ms", "time_vs_ste", "meta_net_ms", "floor_vs_ste",
           "products_ms", "products_floor_vs_ste"]

#: variant -> (estimator name, extra estimator config); ``multifc_bias`` is our fix of the
#: paper's bias-free MultiFC, which cannot descend on signed W̃ (BWN); ``fcgrad_identity``
#: starts FCGrad's linear stack as the identity (the authors' ``symmetric_init``) instead
#: of the random draw whose sign decides whether FCGrad starts uphill.
VARIANTS = {"fcgrad": ("fcgrad", {}), "fcgrad_identity": ("fcgrad", {"init": "identity"}),
            "multifc": ("multifc", {}), "multifc_bias": ("multifc", {"use_bias": True}),
            "lstmfc": ("lstmfc", {})}


def describe(model):
    """What a row actually trained: the estimator and meta network of ``model``."""
    net = getattr(model, "meta_network", None)
    if net is None:
        names = {type(q.kernel_quantizer.estimator).__name__ for q in model._flatten_layers()
                 if getattr(q, "kernel_quantizer", None) is not None}
        return "+".join(sorted(names))
    return (f"{type(net).__name__}(hidden={net.hidden}, layers={net.num_layers}, "
            f"use_bias={net.use_bias}, init={net.init})")


def meta_network_ms(model):
    """``(network, products)``: ms of the meta network's own forward and ``∂/∂φ`` on all
    of ``model``'s meta coordinates (XLA), and of its ``[n, h]·[h, 4h]`` products alone
    (:mod:`kquant_metaquant.cost`); ``None`` where there is no meta network or no such
    product."""
    net = getattr(model, "meta_network", None)
    if net is None:
        return None, None
    from kquant_metaquant import find_meta_kernels
    from kquant_metaquant.cost import meta_network_seconds, products_seconds

    n = sum(int(np.prod(k.kernel.shape)) for k in find_meta_kernels(model.model))
    products = products_seconds(net, n)
    return 1e3 * meta_network_seconds(net, n), None if products is None else 1e3 * products


def _list(value):
    return [v for v in value.split(",") if v] if isinstance(value, str) else list(value)


def _optimizer(name, lr):
    if name == "sgd":
        return keras.optimizers.SGD(lr, momentum=0.9)
    if name == "adam":
        return keras.optimizers.Adam(lr)
    raise ValueError(f"metaquant: option `optimizers` takes 'sgd' and 'adam', got {name!r}.")


def _quantizer(name, bits, estimator):
    if name == "dorefa":
        return {"name": "dorefa", "config": {"bits": bits, "estimator": estimator}}
    if name == "bwn":
        return {"name": "bwn", "config": {"estimator": estimator}}
    raise ValueError(f"metaquant: option `quantizers` takes 'dorefa' and 'bwn', got {name!r}.")


def _variant_model(float_model, qname, bits, variant, hidden, meta_lr):
    import kquant_metaquant

    if variant == "ste":
        estimator = "ste"
    else:
        name, extra = VARIANTS[variant]
        estimator = {"name": name, "config": {"hidden": hidden, **extra}}
    model = kquant.quantize_model(float_model, kernel_quantizer=_quantizer(qname, bits, estimator))
    if variant == "ste":
        return model
    return kquant_metaquant.MetaQuant(model, meta_learning_rate=meta_lr)


def run(cfg):
    require("fcgrad", "multifc", "lstmfc", modules=("kquant_metaquant",))
    data = load_data(cfg)
    (x, y), (xt, yt) = data
    tiny = cfg.tiny
    model_name = cfg.option("model", "small_convnet")
    quantizers = _list(cfg.option("quantizers", "dorefa" if tiny else "dorefa,bwn"))
    optimizers = _list(cfg.option("optimizers", "adam" if tiny else "sgd,adam"))
    variants = _list(cfg.option("variants", "multifc" if tiny else
                                "fcgrad,fcgrad_identity,multifc,multifc_bias,lstmfc"))
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"metaquant: option `variants` takes {', '.join(VARIANTS)}; got {unknown}.")
    bits = int(cfg.option("bits", 1))
    hidden = int(cfg.option("hidden", 16 if tiny else 100))
    fixed_lr = cfg.option("lr")
    meta_lr = float(cfg.option("meta_lr", 1e-3))
    epochs = cfg.epochs_or(quick=8, full=100, tiny=1)
    eager = bool(cfg.option("eager", False))
    jit = str(cfg.option("jit", "on"))
    if jit not in JIT_MODES:
        raise ValueError(f"metaquant: option `jit` takes {', '.join(JIT_MODES)}; got {jit!r}.")
    compile_kwargs = {"jit_compile": JIT_MODES[jit]} if jit_compile_allowed() and not eager else {}

    set_seed(cfg.seed)
    float_model = kquant.models.build(model_name, x.shape[1:], 10)
    rows = []
    for qname in quantizers:
        for opt in optimizers:
            models, metrics = {}, {}
            lr = float(fixed_lr) if fixed_lr is not None else LEARNING_RATES.get((qname, opt), 1e-3)
            for variant in ["ste", *variants]:
                set_seed(cfg.seed)
                model = _variant_model(float_model, qname, bits, variant, hidden, meta_lr)
                compile_classifier(model, _optimizer(opt, lr), run_eagerly=eager, **compile_kwargs)
                jit_used = model.jit_compile
                set_seed(cfg.seed + 1)          # the same shuffling for every variant
                history = model.fit(x, y, batch_size=cfg.batch_size, epochs=epochs,
                                    shuffle=True, verbose=0)
                test_loss, test_acc = model.evaluate(xt, yt, batch_size=cfg.batch_size, verbose=0)
                metrics[variant] = {"lr": float(keras.ops.convert_to_numpy(  # as trained
                                        model.optimizer.learning_rate)),
                                    "test_acc": float(test_acc), "jit": bool(jit_used),
                                    "train_loss": float(history.history["loss"][-1])}
                models[variant] = model
            steps = timing_steps(cfg)
            # short turns: a load change on a shared machine hits all alike
            times = compare_step_times(models, x, y, cfg.batch_size, steps=steps,
                                       rounds=max(1, steps // 6))
            own, products = {}, {}
            for variant in models:
                own[variant], products[variant] = meta_network_ms(models[variant])
            ste_ms = 1e3 * times["ste"]
            for variant in models:
                rows.append({
                    "quantizer": qname if qname == "bwn" else f"dorefa{bits}",
                    "optimizer": opt, "variant": variant, "meta_network": describe(models[variant]),
                    **metrics[variant],
                    "acc_vs_ste": metrics[variant]["test_acc"] - metrics["ste"]["test_acc"],
                    "step_ms": 1e3 * times[variant],
                    "time_vs_ste": times[variant] / times["ste"],
                    # the least a step can cost: STE's step plus the meta network's own work
                    "meta_net_ms": own[variant],
                    "floor_vs_ste": None if own[variant] is None else (ste_ms + own[variant]) / ste_ms,
                    # ... and the least its float32 products alone allow (LSTMFC)
                    "products_ms": products[variant],
                    "products_floor_vs_ste": (None if products[variant] is None
                                              else (ste_ms + products[variant]) / ste_ms),
                })

    def plot(path):
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        labels = [f"{r['quantizer']}/{r['optimizer']}/{r['variant']}" for r in rows]
        ax.barh(labels, [r["time_vs_ste"] for r in rows])
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xlabel("train-step time / STE")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)

    meta = {"model": model_name, "epochs": epochs, "bits": bits, "hidden": hidden,
            "lr": float(fixed_lr) if fixed_lr is not None
            else {f"{q}/{o}": v for (q, o), v in LEARNING_RATES.items()} | {"default": 1e-3},
            "meta_lr": meta_lr, "paper_time_ratio_multifc": 51.15 / 38.17,
            "train_examples": int(len(x)), "test_examples": int(len(xt)),
            "float_params": int(np.sum([np.prod(w.shape) for w in float_model.weights]))}
    return Result("metaquant", rows, meta=meta, plot=plot, columns=COLUMNS)
