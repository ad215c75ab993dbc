"""Float model → quantized twin, keeping the trained weights; a report of what stayed float."""

from __future__ import annotations

import dataclasses
import warnings

import keras

from kquant import quantizers
from kquant.layers import QUANTIZED_TWINS, QuantActivation, QuantMultiHeadAttention
from kquant.layers.base import QuantizedLayerMixin, check_input_quantizer, make_quantizer

#: Reasons a layer with a kernel stays float; only ``UNSUPPORTED`` is an error with ``strict``.
UNSUPPORTED = "unsupported"


@dataclasses.dataclass(frozen=True)
class FloatLayer:
    """A layer with a kernel that ``quantize_model`` left float, and why."""

    path: str   # "outer_model/inner_model/layer"
    kind: str   # its class name
    reason: str  # "no quantized twin for Embedding", "skip_first=True", ...
    requested: bool  # True when the caller asked for it (skip_first/skip_last/layer_filter)


@dataclasses.dataclass
class QuantizationReport:
    """What :func:`quantize_model` converted and every kernel layer it left float."""

    quantized: list = dataclasses.field(default_factory=list)  # paths of converted layers
    left_float: list = dataclasses.field(default_factory=list)  # FloatLayer entries

    @property
    def unsupported(self):
        """Float layers the caller did not ask for (no quantized twin)."""
        return [f for f in self.left_float if not f.requested]

    def __str__(self):
        lines = [f"{len(self.quantized)} layer(s) quantized, {len(self.left_float)} left float"]
        lines += [f"  {f.path} ({f.kind}): {f.reason}" for f in self.left_float]
        return "\n".join(lines)


def _fresh(quantizer):
    """A new quantizer instance per layer (string, dict or instance as template)."""
    if quantizer is None or isinstance(quantizer, (str, dict)):
        return quantizer
    return quantizers.serialize(quantizer)


def _is_graph_model(model):
    return isinstance(model, keras.Sequential) or type(model).__name__ == "Functional"


def _check_graph_model(model, path):
    if not _is_graph_model(model):
        raise TypeError(
            f"quantize_model cannot rewrite the subclassed model {path!r} "
            f"({type(model).__name__}): its layers are wired in Python code. Build it from "
            "kquant layers directly (kquant.QuantDense, kquant.QuantConv2D, ...; same arguments "
            "plus `kernel_quantizer`/`input_quantizer`), or make it a functional or Sequential "
            "model."
        )


def _twin_class(layer):
    """The quantized twin of an exact Keras layer class (not of user subclasses)."""
    name = type(layer).__name__
    if name in QUANTIZED_TWINS and type(layer) is getattr(keras.layers, name, None):
        return QUANTIZED_TWINS[name]
    return None


def _is_quantized(layer):
    """kquant layers, and any layer describing its precision (ALQ, plugins)."""
    return (isinstance(layer, (QuantizedLayerMixin, QuantMultiHeadAttention, QuantActivation))
            or hasattr(layer, "quantization_stats"))


def _has_kernel(layer):
    """Whether a layer owns a kernel-like weight (kernel, embeddings, ...)."""
    names = (v.path.split("/")[-1] for v in layer.weights)
    return any("kernel" in n or n == "embeddings" for n in names)


def _walk(model, prefix=""):
    """``(path, layer)`` for every layer of ``model`` and its nested models, in order."""
    for layer in model.layers:
        path = f"{prefix}{layer.name}"
        if isinstance(layer, keras.Model):
            _check_graph_model(layer, path)
            yield from _walk(layer, path + "/")
        else:
            yield path, layer


def _own_weights(layer):
    """The layer's weights that are not its quantizers' (steps, estimator state)."""
    owned = {id(w) for sub in layer._flatten_layers(include_self=False)
             if isinstance(sub, quantizers.Quantizer) for w in sub.weights}
    return [w for w in layer.weights if id(w) not in owned]


def _copy_weights(source, target, twin):
    src = _own_weights(source) if twin else source.weights
    dst = _own_weights(target) if twin else target.weights
    if len(src) != len(dst) or any(tuple(a.shape) != tuple(b.shape) for a, b in zip(src, dst)):
        raise RuntimeError(
            f"quantize_model: the weights of {source.name!r} ({type(source).__name__}) do not "
            f"match those of its copy ({type(target).__name__}): "
            f"{[tuple(w.shape) for w in src]} vs {[tuple(w.shape) for w in dst]}."
        )
    for a, b in zip(src, dst):
        # a copy: on JAX, assign(a) would share a's buffer, which the twin's training
        # step then donates, deleting the float model's weights
        b.assign(keras.ops.copy(a))


def quantize_model(model, kernel_quantizer="sign", input_quantizer=None, estimator=None,
                   skip_first=False, skip_last=False, quantize_model_input=False,
                   layer_filter=None, strict=False, return_report=False):
    """Replace every Keras layer that has a quantized twin by that twin, weights kept.

    Covered: Dense, EinsumDense, Conv1D/2D/3D, DepthwiseConv1D/2D, SeparableConv1D/2D,
    Conv1D/2D/3DTranspose, LSTM, GRU (kernel and recurrent kernel) and
    MultiHeadAttention (its query/key/value/output projections), in nested
    Sequential/functional models too. ``kernel_quantizer``/``input_quantizer``/
    ``estimator`` are as for the layers (an instance is a template, one copy per
    kernel; ``estimator`` goes only with quantizers given by name).
    ``skip_first``/``skip_last`` keep the first/last convertible layer float;
    the first converted layer does not quantize the raw model input unless
    ``quantize_model_input``. ``layer_filter(layer) -> bool`` restricts conversion.

    Every layer with a kernel that stays float is listed in a
    :class:`QuantizationReport` (``model.quantization_report``; also returned with
    ``return_report=True``); layers without a twin trigger a warning, or a
    ``ValueError`` with ``strict=True``. Subclassed models raise ``TypeError``.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a keras.Model, got {type(model).__name__}.")
    _check_graph_model(model, model.name)
    # validate once, with errors naming the argument (estimator + instance, whole-tensor inputs)
    make_quantizer(kernel_quantizer, estimator, "kernel_quantizer")
    check_input_quantizer(make_quantizer(input_quantizer, estimator, "input_quantizer"))

    report = QuantizationReport()
    candidates = []
    for path, layer in _walk(model):
        if _twin_class(layer) is not None:
            if layer_filter is None or layer_filter(layer):
                candidates.append((path, layer))
            else:
                report.left_float.append(FloatLayer(path, type(layer).__name__,
                                                    "layer_filter returned False", True))
        elif not _is_quantized(layer) and _has_kernel(layer):
            report.left_float.append(FloatLayer(
                path, type(layer).__name__, f"no quantized twin for {type(layer).__name__}",
                False))
    chosen = list(candidates)
    if skip_first and chosen:
        path, layer = chosen.pop(0)
        report.left_float.append(FloatLayer(path, type(layer).__name__, "skip_first=True", True))
    if skip_last and chosen and chosen[-1] is candidates[-1]:
        path, layer = chosen.pop()
        report.left_float.append(FloatLayer(path, type(layer).__name__, "skip_last=True", True))
    if report.unsupported and strict:
        raise ValueError("quantize_model(strict=True): these layers would stay float:\n"
                         + "\n".join(f"  {f.path} ({f.kind}): {f.reason}"
                                     for f in report.unsupported))
    if not chosen and not report.left_float:
        raise ValueError("`model` has no layer with a kernel to quantize.")
    chosen_ids = {id(layer) for _, layer in chosen}
    report.quantized = [path for path, _ in chosen]
    first_id = id(candidates[0][1]) if candidates else None
    pairs = []  # (old, new, is_twin)

    def clone(layer):
        if isinstance(layer, keras.Model):  # a nested subclassed model (graph ones recurse)
            _check_graph_model(layer, layer.name)
        if id(layer) not in chosen_ids:
            new = layer.__class__.from_config(layer.get_config())
            pairs.append((layer, new, False))
            return new
        twin = _twin_class(layer)
        config = layer.get_config()
        config["kernel_quantizer"] = _fresh(kernel_quantizer)
        if twin.__name__ in ("QuantLSTM", "QuantGRU"):
            config["recurrent_quantizer"] = _fresh(kernel_quantizer)
            config.pop("use_cudnn", None)
        if twin.__name__.startswith("QuantDepthwise"):
            config.pop("kernel_initializer", None)
        reads_input = id(layer) == first_id
        config["input_quantizer"] = (
            None if reads_input and not quantize_model_input else _fresh(input_quantizer)
        )
        config["estimator"] = estimator
        new = twin.from_config(config)
        pairs.append((layer, new, True))
        return new

    new_model = keras.models.clone_model(model, clone_function=clone, recursive=True)
    for old, new, is_twin in pairs:
        if isinstance(old, keras.layers.Layer) and old.weights:  # not ops such as `a + b`
            _copy_weights(old, new, is_twin)
    if report.unsupported:
        warnings.warn(f"quantize_model left layers float:\n{report}", stacklevel=2)
    new_model.quantization_report = report
    return (new_model, report) if return_report else new_model
