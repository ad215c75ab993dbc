"""Stable structural paths of a model's variables (no auto-numbered names).

A variable's path is the position of its layer in the model tree (``model.layers``
indices, nested models descend: ``"2/1"``), then the attribute chain through
sublayers (quantizers, estimators), then the variable's own name, e.g.
``"2/1/input_quantizer/estimator/alpha"``. A model rebuilt from its config gets
the same paths, in any process, whatever names Keras numbered its layers with.
"""

from __future__ import annotations

import keras

#: Sublayer attributes walked first (a shared estimator belongs to the input quantizer).
_FIRST = ("input_quantizer", "kernel_quantizer")


def _own_variables(layer):
    return list(getattr(layer, "_trainable_variables", [])) + list(
        getattr(layer, "_non_trainable_variables", []))


def _sublayers(layer):
    # the torch backend's layers are torch Modules: sublayers live in `_modules`
    names = set(vars(layer)) | set(getattr(layer, "_modules", None) or ())
    attrs = {}
    for k in names:
        if k.startswith("_"):
            continue
        v = getattr(layer, k, None)
        if isinstance(v, keras.layers.Layer) and not isinstance(v, keras.Model):
            attrs[k] = v
    ordered = [k for k in _FIRST if k in attrs] + sorted(k for k in attrs if k not in _FIRST)
    return [(k, attrs[k]) for k in ordered]


def structure(model):
    """``(variables, layers)``: path → variable for every weight of ``model``, and
    path → leaf layer. Raises ``ValueError`` if a weight has no structural path."""
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a keras.Model, got {type(model).__name__}.")
    variables, layers, seen = {}, {}, set()

    def walk_layer(layer, prefix):
        for v in _own_variables(layer):
            if id(v) in seen:
                continue
            key = f"{prefix}/{v.name}"
            if key in variables:
                raise ValueError(f"two variables share the structural path {key!r}.")
            seen.add(id(v))
            variables[key] = v
        for attr, sub in _sublayers(layer):
            walk_layer(sub, f"{prefix}/{attr}")

    def walk_model(m, prefix):
        for i, layer in enumerate(m.layers):
            path = f"{prefix}{i}"
            if isinstance(layer, keras.Model):
                walk_model(layer, path + "/")
            else:
                layers[path] = layer
                walk_layer(layer, path)

    walk_model(model, "")
    weights = {id(v) for v in model.weights}
    variables = {k: v for k, v in variables.items() if id(v) in weights}
    reached = {id(v) for v in variables.values()}
    missing = [v.path for v in model.weights if id(v) not in reached]
    if missing:
        raise ValueError(f"variables without a structural path (not owned by a layer of "
                         f"`model.layers` or its quantizers): {missing}.")
    return variables, layers
