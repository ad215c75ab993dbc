"""The ``kquant fit`` job as a function: data → float model → quantized twin → fit."""

from __future__ import annotations

import dataclasses
import math

import keras

from kquant import datasets, models, quantizers
from kquant.callbacks import (
    EDESchedule,
    FlipRatio,
    NonFiniteReport,
    QuantizationLogger,
    estimators_in,
)
from kquant.convert import quantize_model
from kquant.estimators.ede import EDE
from kquant.optimizers.skip_non_finite import SkipNonFinite
from kquant.validation import check_jit_compile


@dataclasses.dataclass
class FitResult:
    model: keras.Model
    history: dict
    test_accuracy: float
    test_loss: float
    float_accuracy: float | None = None


def make_quantizer(name, bits=None, estimator=None, **kwargs):
    """A quantizer by name; ``bits`` for the multi-bit ones (error for binary ones)."""
    if name in (None, "none", "float"):
        return None
    cls = quantizers.registry.get_class(name)
    if bits is not None:
        if "bits" not in cls.__init__.__code__.co_varnames:
            if int(bits) != 1:
                raise ValueError(f"`bits`={bits} does not apply to the 1-bit quantizer {name!r}.")
        else:
            kwargs["bits"] = bits
    return quantizers.get(name, estimator=estimator, **kwargs)


def check_positive(**values):
    """Raise ``ValueError`` naming the argument unless each value is a finite number > 0."""
    for name, value in values.items():
        try:
            ok = math.isfinite(float(value)) and float(value) > 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}.")


def compile_model(model, learning_rate=1e-3, optimizer=None, optimizer_options=None,
                  jit_compile="auto"):
    """Compile for training; ``optimizer`` is a name for :func:`kquant.optimizers.for_training`
    (default Adam), always guarded by ``SkipNonFinite``. ``jit_compile``: Keras' (``"auto"``
    is XLA on JAX and on a TensorFlow that sees a GPU, not on a CPU-only TensorFlow, where
    ``True`` fuses each quantizer into the step: see the overhead benchmark)."""
    from kquant.optimizers import for_training

    model.compile(
        optimizer=for_training(optimizer, learning_rate, **(optimizer_options or {})),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=check_jit_compile(jit_compile),
    )
    return model


def fit(dataset="digits", model="small_convnet", kernel_quantizer="bwn", bits=None,
        input_quantizer=None, input_bits=None, estimator=None, epochs=10, batch_size=64,
        learning_rate=1e-3, seed=0, data_dir=None, float_baseline=False, skip_first=False,
        skip_last=False, verbose=1, callbacks=(), download=False, image_size=(32, 32),
        optimizer=None, optimizer_options=None, jit_compile="auto"):
    """Train a quantized twin of a reference model; return :class:`FitResult`.

    ``dataset`` is a name of :data:`kquant.datasets.NAMES`, a ``.npz`` file or
    an image folder (see :func:`kquant.datasets.load`). ``verbose`` is Keras'
    (``kquant fit`` uses 2, one line per epoch, when stdout is not a TTY).
    """
    check_positive(learning_rate=learning_rate)
    check_jit_compile(jit_compile)
    if optimizer is not None:  # an unknown name or a bad option fails before the data loads
        from kquant.optimizers import for_training

        for_training(optimizer, learning_rate, **(optimizer_options or {}))
    (x, y), (xt, yt) = datasets.load(dataset, data_dir=data_dir, download=download,
                                     image_size=image_size)
    num_classes = int(max(y.max(), yt.max()) + 1)
    float_accuracy = None
    if float_baseline:
        keras.utils.set_random_seed(seed)
        fm = compile_model(models.build(model, x.shape[1:], num_classes), learning_rate,
                           optimizer, optimizer_options, jit_compile)
        fm.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=verbose)
        float_accuracy = float(fm.evaluate(xt, yt, verbose=0)[1])
    keras.utils.set_random_seed(seed)
    base = models.build(model, x.shape[1:], num_classes)
    kq = make_quantizer(kernel_quantizer, bits, estimator)
    iq = make_quantizer(input_quantizer, input_bits, estimator)
    qm = compile_model(
        quantize_model(base, kernel_quantizer=kq, input_quantizer=iq,
                       skip_first=skip_first, skip_last=skip_last),
        learning_rate, optimizer, optimizer_options, jit_compile,
    )
    # kquant's callbacks first, so their log entries reach a user's TensorBoard callback
    cbs = []
    if estimators_in(qm, EDE):
        cbs.append(EDESchedule())
    cbs.append(NonFiniteReport())
    cbs.append(FlipRatio(every=max(1, len(x) // batch_size // 4)))
    boards = [cb for cb in callbacks if isinstance(cb, keras.callbacks.TensorBoard)]
    cbs.append(QuantizationLogger(boards[0] if boards else None))
    cbs += list(callbacks)
    history = qm.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=verbose,
                     validation_data=(xt, yt), callbacks=cbs)
    loss, acc = qm.evaluate(xt, yt, verbose=0)
    return FitResult(qm, history.history, float(acc), float(loss), float_accuracy)


