"""Training callbacks: estimator schedules and quantization diagnostics."""

from __future__ import annotations

import keras
import numpy as np

from kquant.estimators.ede import EDE
from kquant.layers.base import QuantizedLayerMixin


def quantized_layers(model):
    """Every kquant quantized layer in ``model`` (nested models included)."""
    return [layer for layer in model._flatten_layers(include_self=False)
            if isinstance(layer, QuantizedLayerMixin)]


def estimators_in(model, kind=object):
    """Every estimator of type ``kind`` used by the model's quantizers."""
    found = []
    for layer in quantized_layers(model):
        for q in (layer.kernel_quantizer, layer.input_quantizer):
            if q is not None and isinstance(q.estimator, kind) and q.estimator not in found:
                found.append(q.estimator)
    return found


class EDESchedule(keras.callbacks.Callback):
    """Drives every EDE estimator's ``t``/``k`` by training progress (IR-Net).

    Progress ``p = step / total_steps`` with ``total_steps = epochs × steps``
    from ``model.fit`` (or given). ``update="epoch"`` (IR-Net's choice) or
    ``"batch"``.
    """

    def __init__(self, total_steps=None, update="epoch"):
        super().__init__()
        if update not in ("epoch", "batch"):
            raise ValueError(f"EDESchedule: `update` must be 'epoch' or 'batch', got {update!r}.")
        self.total_steps = total_steps
        self.update = update
        self._epoch = 0

    def on_train_begin(self, logs=None):
        self._ede = estimators_in(self.model, EDE)
        self._steps = self.params.get("steps") or 1
        self._total = self.total_steps or (self.params.get("epochs", 1) * self._steps)

    def _set(self, step):
        for est in self._ede:
            est.set_progress(step / max(self._total, 1))

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._set(epoch * self._steps)

    def on_train_batch_begin(self, batch, logs=None):
        if self.update == "batch":
            self._set(self._epoch * self._steps + batch)


class FlipRatio(keras.callbacks.Callback):
    """Share of quantized weights whose level (sign) changed, every ``every`` steps.

    Records ``history`` (overall ratio per measurement) and ``per_layer`` and
    adds ``flip_ratio`` to the epoch logs (mean over the epoch).
    """

    def __init__(self, every=1):
        super().__init__()
        if int(every) < 1:
            raise ValueError(f"FlipRatio: `every` must be >= 1, got {every}.")
        self.every = int(every)
        self.history: list[float] = []
        self.per_layer: dict[str, list[float]] = {}

    def _codes(self):
        return {
            layer.name: layer.kernel_quantizer.encode(layer.latent_kernel)[0]
            for layer in quantized_layers(self.model) if layer.kernel_quantizer is not None
        }

    def on_train_begin(self, logs=None):
        self._last = self._codes()
        self._step = 0
        self._epoch_values = []

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        if self._step % self.every:
            return
        codes = self._codes()
        changed = total = 0
        for name, c in codes.items():
            diff = int(np.count_nonzero(c != self._last[name]))
            self.per_layer.setdefault(name, []).append(diff / c.size)
            changed, total = changed + diff, total + c.size
        self._last = codes
        ratio = changed / total if total else 0.0
        self.history.append(ratio)
        self._epoch_values.append(ratio)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self._epoch_values:
            logs["flip_ratio"] = float(np.mean(self._epoch_values))
        self._epoch_values = []


class NonFiniteReport(keras.callbacks.Callback):
    """Warns once when the optimizer skipped steps for NaN/inf gradients.

    Reads :class:`kquant.optimizers.SkipNonFinite`'s ``skipped_steps`` or
    :class:`kquant.optimizers.ALQ`'s ``non_finite_steps`` at each epoch end
    (and at train end) and logs the count as ``skipped_steps``.
    """

    def _check(self, logs=None):
        opt = getattr(self.model, "optimizer", None)
        warn = getattr(opt, "warn_if_skipped", None) or getattr(opt, "warn_if_non_finite", None)
        if warn is None:
            return
        count = warn()
        if count is None:
            count = getattr(opt, "non_finite_steps", 0)
        if logs is not None:
            logs["skipped_steps"] = int(count)

    def on_epoch_end(self, epoch, logs=None):
        self._check(logs)

    def on_train_end(self, logs=None):
        self._check(None)


def layer_bits(model) -> dict[str, tuple[float, int]]:
    """``{layer name: (average bits per quantized weight, weights)}`` of every quantized layer.

    Covers kquant's quantized layers and ALQ layers (fractional bits after pruning).
    """
    out = {}
    for layer in model._flatten_layers(include_self=False):
        stats = getattr(layer, "quantization_stats", None)
        if stats is None:
            continue
        s = stats()
        if s.kernel_params and s.kernel_bits < 32:
            out[layer.name] = (float(s.kernel_bits), int(s.kernel_params))
    return out


class QuantizationLogger(keras.callbacks.Callback):
    """Adds ``average_bits`` (over all quantized weights) to the epoch logs; with a
    :class:`keras.callbacks.TensorBoard` also writes per-layer bitwidths.

    Keras' TensorBoard callback writes every entry of the epoch logs as an
    ``epoch_<name>`` scalar, so ``average_bits`` here, ``flip_ratio``
    (:class:`FlipRatio`) and ``skipped_steps`` (:class:`NonFiniteReport`)
    appear in TensorBoard as long as these callbacks come **before** the
    TensorBoard callback in the ``callbacks`` list (``kquant.training.fit``
    orders them so). Given ``tensorboard=``, this callback also writes, with
    that callback's writer, a scalar ``bits/<layer>`` per quantized layer and a
    histogram ``bits/per_layer`` of their bitwidths; that needs TensorFlow's
    ``tf.summary`` (the TensorFlow backend; on JAX/torch only the scalars in
    the logs are written, and only if TensorFlow is installed for the
    TensorBoard callback itself).
    """

    def __init__(self, tensorboard=None):
        super().__init__()
        if tensorboard is not None and not isinstance(tensorboard, keras.callbacks.TensorBoard):
            raise TypeError("QuantizationLogger: `tensorboard` must be a keras.callbacks.TensorBoard, "
                            f"got {type(tensorboard).__name__}.")
        self.tensorboard = tensorboard
        self.history: list[dict[str, float]] = []

    def on_epoch_end(self, epoch, logs=None):
        bits = layer_bits(self.model)
        self.history.append({name: b for name, (b, _) in bits.items()})
        n = sum(count for _, count in bits.values())
        if logs is not None and n:
            logs["average_bits"] = sum(b * count for b, count in bits.values()) / n
        if self.tensorboard is not None and bits and keras.backend.backend() == "tensorflow":
            self._write(epoch, bits)

    def _write(self, epoch, bits):
        import tensorflow as tf

        writer = self.tensorboard._train_writer  # the callback's own event file
        with writer.as_default():
            for name, (b, _) in bits.items():
                tf.summary.scalar(f"bits/{name}", b, step=epoch)
            tf.summary.histogram("bits/per_layer", np.array([b for b, _ in bits.values()]),
                                 step=epoch)
        writer.flush()
