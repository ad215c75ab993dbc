"""ste_equivalence: "Custom gradient estimators are STEs in disguise", Tables 3/4 and 5.

Chollet's 3-layer convnet (:func:`kquant.models.chollet`, He-uniform init),
2-bit uniform weights per layer on the init range ``[−L, L]``
(``L = √(6/fan_in)``, levels ``−L, −L/3, L/3, L``; activations float), HTGE,
cosine learning rate with 2 % linear warm-up. Nets trained on the same
batches in lockstep (:func:`kquant.analysis.fit_in_lockstep`):

* SGD (momentum 0.9, lr 1e-3): Q̂ net; its STE twin (:func:`kquant.analysis.to_ste`:
  weights M(w₀), lr α·η on the quantized kernels only, η on biases); Q̂ net
  with lr +1 % ("lr-tweak"); STE net with
  the Q̂ net's weights and lr ("unadjusted").
* Adam (β = 0.9, 0.95, lr 1e-4): Q̂ net; STE twin (same weights and lr); lr-tweak.
* Plain SGD (no momentum, lr 1e-2 = the momentum runs' effective η/(1−β)): Q̂ net,
  STE twin, lr-tweak — not in the paper; it isolates the effect of momentum.

Reported per pair: Ē (SGD baseline: |M(w_Q̂) − w_STE|, otherwise
|w_a − w_b|, normalised by the representable range, mean over all weights),
quantized-weight agreement, train/val accuracy and loss of both nets, and the
paper's MNIST numbers beside them. The plot shows Ē during training.

HTGE sharpness: the paper sets ``t`` to "5.5 times the maximum value from the
weight initialization"; in weight units only ``5.5 / L`` gives every layer the
same shape relative to its bins, which is ``t = 5.5/L · Δ = 11/3`` in kquant's
bin units (``tanh(t·s/2)``, ``s`` in half steps). That is the default here
(``α = t²/(t + sinh t) ≈ 0.578``).

Why the SGD twin can drift further than the lr-tweak pair here, while the paper
reports it closer (0.515 % vs 0.572 %). The theorem is first order in η. With
heavy-ball momentum the Q̂ net's buffer sums ``g_{t−k}·Q̂'(w_{t−k})`` over past
weights while ``M'(w_t) = α/Q̂'(w_t)`` is taken at the current one, so each step of
``M(w)`` differs from the twin's by ``αη Σ_k β^k g_{t−k}(Q̂'(w_{t−k})/Q̂'(w_t) − 1)``:
second order, but weighted by ``Σ k β^k = β/(1−β)² = 90`` at β = 0.9 against ½ for
plain SGD, while the lr-tweak perturbation (1 % of a step) grows only by 1/(1−β).
Measured on 8×8 digits (30 epochs, 330 steps; ``python -m benchmarks
ste_equivalence --quick``): with momentum the twin/tweak Ē ratio is 1.8 (and 1.1,
1.4 at η/2, η/4 — the same code with ``SGD_LR`` changed), with plain SGD at the same
effective learning rate it is 0.55 (0.69 at half that rate), below 1 as in the paper. At
the paper's MNIST length both errors saturate near each other (trajectories of
quantized nets diverge once a weight crosses a bin edge differently), which is
where its 0.515 % vs 0.572 % sits; a 330-step run is before that regime, so the
ratio there reflects the size of the per-step perturbations.
"""

from __future__ import annotations

import math
import time

import keras
import numpy as np

import kquant
from kquant.benchmarks.common import BenchConfig, Result, compile_classifier, load_data, set_seed
from kquant import analysis

# the -o KEY=VALUE settings this benchmark reads (others are refused)
OPTIONS = {}

NAME = "ste_equivalence"
HTGE_T = 11.0 / 3.0
SGD_LR, SGD_MOMENTUM = 1e-3, 0.9
PLAIN_SGD_LR = SGD_LR / (1.0 - SGD_MOMENTUM)   # same effective step, no momentum
ADAM_LR, ADAM_BETAS = 1e-4, (0.9, 0.95)
LR_TWEAK = 1.01
WARMUP = 0.02

#: The paper's MNIST numbers (Table 4): Ē %, agreement %.
PAPER = {
    "baseline (S)": (0.515, 98.31),
    "lr-tweak (S)": (0.572, 98.66),
    "unadjusted (S)": (2.52, 96.53),
    "baseline (A)": (2.81, 94.42),
    "lr-tweak (A)": (1.74, 95.4),
}

#: Rows the paper does not have (its columns are left empty there).
EXTRA_ROWS = ("baseline (S, β=0)", "lr-tweak (S, β=0)")

COLUMNS = ["experiment", "pair", "E_bar_%", "agreement_%", "paper_E_bar_%", "paper_agreement_%",
           "train_acc_a", "train_acc_b", "val_acc_a", "val_acc_b",
           "train_loss_a", "train_loss_b", "val_loss_a", "val_loss_b"]


def init_range(kernel_shape):
    """``L = √(6/fan_in)``: the bound of He-uniform initialisation."""
    fan_in = math.prod(kernel_shape[:-1])
    return math.sqrt(6.0 / fan_in)


def build_q_net(input_shape, num_classes, t=HTGE_T, seed=0):
    """Chollet's convnet with every kernel 2-bit uniform on its init range, HTGE(t)."""
    set_seed(seed)
    model = kquant.models.chollet(input_shape, num_classes)
    names = [l.name for l in model.layers if type(l).__name__ in ("Conv2D", "Dense")]
    for name in names:
        layer = model.get_layer(name)
        bound = init_range(tuple(layer.kernel.shape))
        quantizer = kquant.quantizers.Uniform(
            bits=2, symmetric=False, step=2.0 * bound / 3.0, offset=-bound,
            estimator={"name": "htge", "config": {"t": float(t)}},
        )
        model = kquant.quantize_model(model, kernel_quantizer=quantizer,
                                      layer_filter=lambda l, n=name: l.name == n)
    return model


def cosine_schedule(lr, total_steps):
    warmup = max(1, round(WARMUP * total_steps))
    return keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=max(1, total_steps - warmup), warmup_target=lr, warmup_steps=warmup)


def _copy(model):
    twin = keras.models.clone_model(model)
    twin.set_weights(model.get_weights())
    return twin


def _compile(model, optimizer, eager=False):
    jit = False if keras.backend.backend() == "tensorflow" else "auto"
    return compile_classifier(model, optimizer, jit_compile=jit, run_eagerly=eager)


def _metrics(model, x, y, batch_size):
    """Mean loss and accuracy, by eager forward passes (no per-model tracing)."""
    logits = np.concatenate([keras.ops.convert_to_numpy(model(x[i:i + 512], training=False))
                             for i in range(0, len(x), 512)])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, logits)
    return float(keras.ops.convert_to_numpy(loss)), float(np.mean(logits.argmax(-1) == y))


def _group(q_net, optimizer, pairs_spec, data, cfg, epochs, every):
    """Train the nets of one optimizer group in lockstep; rows and Ē curves per pair."""
    (x, y), (xt, yt) = data
    nets = {"q": q_net}
    optimizers = {"q": optimizer}
    maps = None
    for key, make in pairs_spec["nets"].items():
        nets[key], optimizers[key], extra = make(q_net, optimizer)
        maps = extra or maps
    for key, net in nets.items():
        # Tiny on TF: tracing would dominate a few steps (JAX's eager mode is slower still).
        _compile(net, optimizers[key], eager=cfg.tiny and keras.backend.backend() == "tensorflow")
    recorders = {}
    for label, (a, b, mapped) in pairs_spec["pairs"].items():
        recorders[label] = analysis.AlignmentRecorder(
            nets[a], nets[b], mapped=mapped, every=every, maps=maps if mapped else None)
    keys = list(nets)
    fit_histories = analysis.fit_in_lockstep(
        [nets[k] for k in keys], x, y, epochs=epochs, batch_size=cfg.batch_size,
        seed=cfg.seed, callbacks=list(recorders.values()))
    scores = {k: (_metrics(nets[k], x, y, cfg.batch_size) + _metrics(nets[k], xt, yt, cfg.batch_size))
              for k in keys}
    rows, curves = [], {}
    for label, (a, b, mapped) in pairs_spec["pairs"].items():
        last = recorders[label].history[-1]
        (tl_a, ta_a, vl_a, va_a), (tl_b, ta_b, vl_b, va_b) = scores[a], scores[b]
        row = {
            "experiment": label,
            "pair": pairs_spec["names"][label],
            "E_bar_%": 100.0 * last["alignment_error"],
            "agreement_%": 100.0 * last["agreement"],
            "train_acc_a": ta_a, "train_acc_b": ta_b, "val_acc_a": va_a, "val_acc_b": va_b,
            "train_loss_a": tl_a, "train_loss_b": tl_b, "val_loss_a": vl_a, "val_loss_b": vl_b,
        }
        if label in PAPER:   # the rows the paper has (β=0 rows are ours)
            row["paper_E_bar_%"], row["paper_agreement_%"] = PAPER[label]
        rows.append(row)
        curves[label] = [(h["step"], 100.0 * h["alignment_error"]) for h in recorders[label].history]
    trained = {k: {key: float(v) for key, v in optimizers[k].get_config().items()
                   if key in ("momentum", "beta_1", "beta_2")} for k in keys}
    for row, (a, b, _) in zip(rows, pairs_spec["pairs"].values()):
        row["_optimizers"] = {"a": trained[a], "b": trained[b]}
    first_loss = {k: h["loss"][0] for k, h in zip(keys, fit_histories)}
    last_loss = {k: h["loss"][-1] for k, h in zip(keys, fit_histories)}
    return rows, curves, first_loss, last_loss


def _tweak(q_net, optimizer):
    return _copy(q_net), analysis.scale_learning_rate(optimizer, LR_TWEAK), None


def _twin(q_net, optimizer, adaptive=None):
    twin = analysis.to_ste(q_net, optimizer, adaptive=adaptive)
    return twin.model, twin.optimizer, twin.equivalences


def run(cfg: BenchConfig) -> Result:
    t_start = time.perf_counter()
    data = load_data(cfg)
    (x, y), (xt, yt) = data
    num_classes = int(max(y.max(), yt.max())) + 1
    epochs = cfg.epochs_or(quick=30, full=12 if cfg.dataset != "digits" else 60, tiny=1)
    steps_per_epoch = math.ceil(len(x) / cfg.batch_size)
    total = max(1, epochs * steps_per_epoch)
    every = max(1, total // 50)
    q_template = build_q_net(x.shape[1:], num_classes, seed=cfg.seed)
    alpha = analysis.lr_factor(quantizer=analysis.quantized_layers(q_template)[0].kernel_quantizer)

    sgd = keras.optimizers.SGD(cosine_schedule(SGD_LR, total), momentum=SGD_MOMENTUM)
    sgd_spec = {
        "nets": {
            "ste": _twin,
            "tweak": _tweak,
            # unadjusted: the STE net keeps the Q̂ net's weights and learning rate.
            "unadjusted": lambda q, o: _twin(q, o, adaptive=True),
        },
        "pairs": {"baseline (S)": ("q", "ste", True), "lr-tweak (S)": ("q", "tweak", False),
                  "unadjusted (S)": ("q", "unadjusted", False)},
        "names": {"baseline (S)": "Q̂ (η) vs STE (α·η, M(w₀))",
                  "lr-tweak (S)": "Q̂ (η) vs Q̂ (1.01·η)",
                  "unadjusted (S)": "Q̂ (η) vs STE (η, w₀)"},
    }
    adam = keras.optimizers.Adam(cosine_schedule(ADAM_LR, total), beta_1=ADAM_BETAS[0],
                                 beta_2=ADAM_BETAS[1])
    adam_spec = {
        "nets": {"ste": _twin, "tweak": _tweak},
        "pairs": {"baseline (A)": ("q", "ste", False), "lr-tweak (A)": ("q", "tweak", False)},
        "names": {"baseline (A)": "Q̂ (η) vs STE (η, w₀)",
                  "lr-tweak (A)": "Q̂ (η) vs Q̂ (1.01·η)"},
    }
    plain = keras.optimizers.SGD(cosine_schedule(PLAIN_SGD_LR, total), momentum=0.0)
    plain_spec = {
        "nets": {"ste": _twin, "tweak": _tweak},
        "pairs": {"baseline (S, β=0)": ("q", "ste", True), "lr-tweak (S, β=0)": ("q", "tweak", False)},
        "names": {"baseline (S, β=0)": "Q̂ (η) vs STE (α·η, M(w₀)), no momentum",
                  "lr-tweak (S, β=0)": "Q̂ (η) vs Q̂ (1.01·η), no momentum"},
    }
    rows, curves, losses = [], {}, {}
    trained = {}
    for group, optimizer, spec in (("sgd", sgd, sgd_spec), ("adam", adam, adam_spec),
                                   ("sgd_plain", plain, plain_spec)):
        q_net = _copy(q_template)
        r, c, first, last = _group(q_net, optimizer, spec, data, cfg, epochs, every)
        for row in r:
            trained[row["experiment"]] = row.pop("_optimizers")
        rows += r
        curves.update(c)
        losses[group] = {"first_epoch_loss": first, "last_epoch_loss": last}

    def plot(path):
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for label, points in curves.items():
            steps, values = zip(*points)
            ax.plot(steps, values, label=label,
                    linestyle="-" if "(S)" in label else (":" if "β=0" in label else "--"))
        ax.set_xlabel("training step")
        ax.set_ylabel("Ē (% of representable range)")
        ax.set_title(f"STE equivalence, {cfg.dataset}, HTGE t={HTGE_T:.3g}, 2-bit")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    meta = {
        "alpha": alpha,
        "htge_t": HTGE_T,
        "sgd": {"lr": SGD_LR, "momentum": SGD_MOMENTUM},
        "sgd_plain": {"lr": PLAIN_SGD_LR, "momentum": 0.0},
        "trained_optimizers": trained,   # read back from each pair's optimizers after training
        "adam": {"lr": ADAM_LR, "betas": ADAM_BETAS},
        "lr_tweak": LR_TWEAK,
        "epochs": epochs,
        "steps": total,
        "n_train": int(len(x)),
        "n_val": int(len(xt)),
        "epoch_losses": losses,
        "curves": curves,
        "paper": PAPER,
        "seconds": time.perf_counter() - t_start,
    }
    return Result(name=NAME, rows=rows, meta=meta, plot=plot, columns=COLUMNS)
