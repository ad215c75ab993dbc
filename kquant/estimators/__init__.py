"""Gradient estimators: the plugin registry (entry-point group ``kquant.estimators``).

>>> kquant.estimators.available()          # name -> one-line description
>>> kquant.estimators.get("htge", t=4.0)   # an Estimator instance
"""

from __future__ import annotations

import keras

from kquant.estimators.base import ElementwiseEstimator, Estimator
from kquant.registry import Registry, UnknownNameError

registry = Registry("kquant.estimators", "estimator")


def available() -> dict[str, str]:
    """Installed estimators: name -> one-line description."""
    return registry.available()


def serialize(estimator: Estimator) -> dict | str:
    """``{"name": registered_name, "config": {...}}`` (Keras form if unregistered)."""
    name = registry.name_of(type(estimator))
    if name is None:
        return keras.saving.serialize_keras_object(estimator)
    return {"name": name, "config": estimator.get_config()}


def get(identifier, **kwargs) -> Estimator:
    """An estimator from a name, a ``serialize`` dict, or an instance."""
    if isinstance(identifier, Estimator):
        if kwargs:
            raise ValueError("Keyword arguments apply only when the estimator is given by name.")
        return identifier
    if isinstance(identifier, str):
        return registry.get(identifier, **kwargs)
    if isinstance(identifier, dict) and "name" in identifier and "class_name" not in identifier:
        config = {**identifier.get("config", {}), **kwargs}
        return registry.get(identifier["name"], **config)
    if isinstance(identifier, dict):
        return keras.saving.deserialize_keras_object(identifier)
    raise TypeError(
        f"Cannot interpret estimator {identifier!r}: use a name from "
        f"{registry.names()}, a dict from kquant.estimators.serialize, or an Estimator."
    )


__all__ = [
    "ElementwiseEstimator",
    "Estimator",
    "UnknownNameError",
    "available",
    "get",
    "registry",
    "serialize",
]
