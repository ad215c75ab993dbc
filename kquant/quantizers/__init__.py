"""Forward quantizers: the plugin registry (entry-point group ``kquant.quantizers``)."""

from __future__ import annotations

import keras

from kquant.quantizers.base import Quantizer, check_bits
from kquant.quantizers.dorefa import DoReFa
from kquant.quantizers.pact import PACT
from kquant.quantizers.sign import BWN, Sign
from kquant.quantizers.stochastic import StochasticSign
from kquant.quantizers.ternary import TWN, BitNet
from kquant.quantizers.uniform import Uniform
from kquant.registry import Registry

registry = Registry("kquant.quantizers", "quantizer")


def available() -> dict[str, str]:
    """Installed forward quantizers: name -> one-line description."""
    return registry.available()


def serialize(quantizer: Quantizer | None):
    if quantizer is None:
        return None
    name = registry.name_of(type(quantizer))
    if name is None:
        return keras.saving.serialize_keras_object(quantizer)
    return {"name": name, "config": quantizer.get_config()}


def get(identifier, estimator=None, **kwargs) -> Quantizer | None:
    """A quantizer from a name (``"dorefa"``), a ``serialize`` dict, or an instance.

    ``estimator`` (and ``kwargs``) apply when the quantizer is given by name.
    """
    if identifier is None:
        return None
    if isinstance(identifier, Quantizer):
        return identifier
    if isinstance(identifier, str):
        if estimator is not None:
            kwargs["estimator"] = estimator
        return registry.get(identifier, **kwargs)
    if isinstance(identifier, dict) and "name" in identifier and "class_name" not in identifier:
        config = dict(identifier.get("config", {}))
        if estimator is not None:
            config["estimator"] = estimator
        return registry.get(identifier["name"], **config)
    if isinstance(identifier, dict):
        return keras.saving.deserialize_keras_object(identifier)
    raise TypeError(
        f"Cannot interpret quantizer {identifier!r}: use a name from {registry.names()}, "
        "a dict from kquant.quantizers.serialize, or a Quantizer."
    )


def quantizer(name: str, **kwargs) -> Quantizer:
    """``kquant.quantizer("dorefa", bits=2, estimator="htge")``."""
    return get(name, **kwargs)


__all__ = ["BWN", "PACT", "TWN", "BitNet", "DoReFa", "Quantizer", "Sign", "StochasticSign",
           "Uniform", "available", "check_bits", "get", "quantizer", "registry", "serialize"]
