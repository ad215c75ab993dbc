"""Optimizers: the plugin registry (entry-point group ``kquant.optimizers``).

Built-ins: ``alq`` (:class:`ALQ`, loss-aware multi-bit quantization), ``bop``
(:class:`Bop`, the binary optimizer), ``routing`` (:class:`RoutingOptimizer`,
a per-variable choice of optimizer) and ``skip_non_finite``
(:class:`SkipNonFinite`, skips steps with NaN/inf gradients).

>>> kquant.optimizers.available()                 # name -> one-line description
>>> kquant.optimizers.get("bop", gamma=1e-3)      # an optimizer instance
>>> kquant.optimizers.get("adam", learning_rate=1e-3)   # Keras' own names too
"""

from __future__ import annotations

import warnings

import keras

from kquant.alq.optimizer import ALQ, PHASES
from kquant.optimizers.bop import Bop
from kquant.optimizers.predicates import PREDICATES, is_binary_variable, mark_binary
from kquant.optimizers.routing import RoutingOptimizer
from kquant.optimizers.skip_non_finite import SkipNonFinite
from kquant.registry import OWN_DISTRIBUTION, Registry, UnknownNameError

registry = Registry("kquant.optimizers", "optimizer")


def available() -> dict[str, str]:
    """Installed optimizers: name -> one-line description."""
    return registry.available()


def serialize(optimizer) -> dict:
    """``{"name": registered_name, "config": {...}}`` (Keras form if unregistered)."""
    name = registry.name_of(type(optimizer))
    if name is None:
        return keras.saving.serialize_keras_object(optimizer)
    return {"name": name, "config": optimizer.get_config()}


def _keras_class(name):
    try:
        optimizer = keras.optimizers.get(name)
    except ValueError:
        return None
    return type(optimizer)


def _class_for(name: str) -> type:
    """The class a name means: kquant's built-ins, then Keras' optimizers, then plugins."""
    name = name.strip().lower()
    plugin = {p.name: p for p in registry.info()}.get(name)
    if ":" in name or (plugin is not None and plugin.package == OWN_DISTRIBUTION):
        return registry.get_class(name)
    cls = _keras_class(name)
    if cls is not None:
        if plugin is not None:  # Keras' own names are never replaced
            warnings.warn(f"kquant: optimizer {name!r} of {plugin.package} is shadowed by Keras' "
                          f"{name!r}; use {plugin.package + ':' + name!r} for the plugin.",
                          RuntimeWarning, stacklevel=3)
        return cls
    try:
        return registry.get_class(name)
    except UnknownNameError as e:
        raise UnknownNameError(f"{e} Keras optimizer names (adam, sgd, ...) work too.") from None


def get(identifier, **kwargs):
    """An optimizer from a registered name (plain or ``distribution:name``), a
    Keras optimizer name (``"adam"``), a ``serialize`` dict, a Keras config dict,
    or an instance. Plain names resolve to kquant's built-ins first, then Keras'
    optimizers, then third-party plugins (a plugin shadowed by a Keras name is
    reachable as ``distribution:name``, with a warning)."""
    if isinstance(identifier, keras.optimizers.Optimizer):
        if kwargs:
            raise ValueError("Keyword arguments apply only when the optimizer is given by name.")
        return identifier
    if isinstance(identifier, str):
        return _class_for(identifier)(**kwargs)
    if isinstance(identifier, dict) and "name" in identifier and "class_name" not in identifier:
        config = {**identifier.get("config", {}), **kwargs}
        return registry.get_class(identifier["name"]).from_config(config)
    if isinstance(identifier, dict):
        return keras.saving.deserialize_keras_object(identifier)
    raise TypeError(
        f"Cannot interpret optimizer {identifier!r}: use a name from {registry.names()} "
        "or a Keras optimizer name, a dict from kquant.optimizers.serialize, or an Optimizer."
    )


__all__ = [
    "ALQ",
    "PHASES",
    "PREDICATES",
    "Bop",
    "RoutingOptimizer",
    "SkipNonFinite",
    "UnknownNameError",
    "available",
    "for_training",
    "get",
    "is_binary_variable",
    "mark_binary",
    "registry",
    "serialize",
]


def for_training(name=None, learning_rate=1e-3, **options):
    """The optimizer ``kquant fit`` compiles with: ``name`` (default Adam) built with
    ``options`` (and ``learning_rate`` when it takes one and none is given), guarded
    by :class:`SkipNonFinite`. A binary-only optimizer (Bop) trains the binary kernels
    and Adam(``learning_rate``) the other variables, through :class:`RoutingOptimizer`."""
    import inspect

    name = "adam" if name is None else name
    if not isinstance(name, str):  # an instance or a config dict
        optimizer = get(name, **options)
    else:
        cls = _class_for(name)
        if "learning_rate" not in options and \
                "learning_rate" in inspect.signature(cls.__init__).parameters:
            options = {**options, "learning_rate": learning_rate}
        try:
            optimizer = cls(**options)
        except (TypeError, ValueError) as e:
            raise ValueError(f"optimizer {name!r} with options {options}: {e}") from e
    if getattr(optimizer, "binary_only", False):
        optimizer = RoutingOptimizer([("binary_kernels", optimizer)],
                                     default=keras.optimizers.Adam(learning_rate))
    if isinstance(optimizer, (SkipNonFinite, ALQ)):  # ALQ has the guard built in
        return optimizer
    return SkipNonFinite(optimizer)
