"""Per-variable routing: each variable is trained by the optimizer of its route
(Larq's ``CaseOptimizer``), e.g. binary kernels with Bop, the rest with Adam.

A route is ``(rule, optimizer)``; the rule is

* a predicate name from :data:`kquant.optimizers.predicates.PREDICATES`
  (``"binary_kernels"``, ``"all"``),
* a compiled regular expression (``re.compile(r"dense_1/")``), searched in
  ``variable.path``,
* or a callable ``variable -> bool`` (works, but the optimizer then cannot be
  serialized: ``get_config`` raises).

A variable matched by no route goes to ``default``; one matched by two routes
is an error. The children's state is part of this optimizer's ``variables``
(own ``iterations`` first, then each child's in route order, ``default``
last), so it saves, restores and runs statelessly (JAX) with the model.
"""

from __future__ import annotations

import re

import keras

from kquant.optimizers.predicates import PREDICATES


def _as_optimizer(identifier, argument):
    from kquant.optimizers import get

    try:
        return get(identifier)
    except (TypeError, ValueError) as e:
        raise type(e)(f"RoutingOptimizer: `{argument}`: {e}") from e


def _check_rule(rule, argument):
    if isinstance(rule, str):
        if rule not in PREDICATES:
            raise ValueError(
                f"RoutingOptimizer: `{argument}` {rule!r} is not a named predicate; known: "
                f"{sorted(PREDICATES)} (use re.compile(...) for a regex on variable.path).")
        return rule
    if isinstance(rule, re.Pattern) or callable(rule):
        return rule
    raise TypeError(f"RoutingOptimizer: `{argument}` must be a predicate name, a compiled "
                    f"regex or a callable, got {type(rule).__name__}.")


def _matches(rule, variable):
    if isinstance(rule, str):
        return bool(PREDICATES[rule](variable))
    if isinstance(rule, re.Pattern):
        return rule.search(variable.path) is not None
    return bool(rule(variable))


def _describe(rule):
    if isinstance(rule, re.Pattern):
        return f"re.compile({rule.pattern!r})"
    return repr(rule) if isinstance(rule, str) else getattr(rule, "__name__", repr(rule))


@keras.saving.register_keras_serializable("kquant")
class RoutingOptimizer(keras.optimizers.Optimizer):
    """Trains each variable with the optimizer of the route its rule selects.

    Args:
        routes: list of ``(rule, optimizer)`` pairs (see the module docstring);
            an optimizer may be given by name (``kquant.optimizers.get``).
        default: the optimizer of the variables no rule selects.
        name: optional name.

    ``learning_rate`` reads and sets the ``default`` optimizer's (so Keras'
    learning-rate callbacks act on it).
    """

    def __init__(self, routes=(), default="adam", name=None, **kwargs):
        if kwargs:
            raise ValueError(f"RoutingOptimizer does not take arguments {sorted(kwargs)}; "
                             "set them on the child optimizers.")
        if isinstance(routes, (str, bytes)) or not hasattr(routes, "__iter__"):
            raise TypeError("RoutingOptimizer: `routes` must be a list of (rule, optimizer) pairs, "
                            f"got {routes!r}.")
        checked = []
        for i, route in enumerate(routes):
            if isinstance(route, dict):  # the get_config form
                route = _route_from_config(route, f"routes[{i}]")
            if not (isinstance(route, (tuple, list)) and len(route) == 2):
                raise TypeError(f"RoutingOptimizer: `routes[{i}]` must be a (rule, optimizer) "
                                f"pair, got {route!r}.")
            rule, optimizer = route
            checked.append((_check_rule(rule, f"routes[{i}]"),
                            _as_optimizer(optimizer, f"routes[{i}]")))
        default = _as_optimizer(default, "default")
        children = [opt for _, opt in checked] + [default]
        if len({id(opt) for opt in children}) != len(children):
            raise ValueError("RoutingOptimizer: each route needs its own optimizer instance "
                             "(one instance appears twice).")
        super().__init__(learning_rate=0.0, name=name)
        self._rules = [rule for rule, _ in checked]
        self.optimizers = children
        self._route_index = []

    @property
    def default(self):
        """The optimizer of the variables no rule selects."""
        return self.optimizers[-1]

    @property
    def routes(self):
        """``[(rule, optimizer), ...]`` without the default."""
        return list(zip(self._rules, self.optimizers[:-1]))

    @property
    def learning_rate(self):
        return self.default.learning_rate

    @learning_rate.setter
    def learning_rate(self, value):
        self.default.learning_rate = value

    @property
    def variables(self):
        own = self._variables[:]
        for opt in self.optimizers:
            own.extend(opt.variables)
        return own

    def route_of(self, variable) -> int:
        """Index (into :attr:`optimizers`) of the optimizer that trains ``variable``."""
        hits = [i for i, rule in enumerate(self._rules) if _matches(rule, variable)]
        if len(hits) > 1:
            raise ValueError(
                f"RoutingOptimizer: variable {variable.path!r} matches several routes: "
                f"{', '.join(_describe(self._rules[i]) for i in hits)}; make the rules disjoint.")
        return hits[0] if hits else len(self.optimizers) - 1

    def build(self, var_list):
        if self.built:
            return
        var_list = list(var_list)
        route_index = [self.route_of(v) for v in var_list]
        super().build(var_list)
        for k, opt in enumerate(self.optimizers):
            if not opt.built:
                opt.build([v for v, r in zip(var_list, route_index) if r == k])
        self._route_index = route_index

    def apply(self, grads, trainable_variables=None):
        grads = list(grads)
        if not grads:
            return
        if trainable_variables is None:
            if not self.built:
                raise ValueError("RoutingOptimizer: pass `trainable_variables` on the first call "
                                 "or build the optimizer first.")
            trainable_variables = self._trainable_variables
        else:
            trainable_variables = list(trainable_variables)
            if not self.built:
                self.build(trainable_variables)
            self._check_variables_are_known(trainable_variables)
        per_route = [([], []) for _ in self.optimizers]
        for grad, variable in zip(grads, trainable_variables):
            g, v = per_route[self._route_index[self._get_variable_index(variable)]]
            g.append(grad)
            v.append(variable)
        for opt, (g, v) in zip(self.optimizers, per_route):
            if v:
                opt.apply(g, v)
        self._iterations.assign_add(1)

    def finalize_variable_values(self, var_list):
        for opt in self.optimizers:
            opt.finalize_variable_values(
                [v for v in var_list if self._var_key(v) in opt._trainable_variables_indices])

    def get_config(self):
        routes = []
        for rule, opt in self.routes:
            if isinstance(rule, str):
                entry = {"predicate": rule}
            elif isinstance(rule, re.Pattern):
                entry = {"path": rule.pattern}
            else:
                raise ValueError(
                    f"RoutingOptimizer: the callable route {_describe(rule)} cannot be "
                    "serialized; use a named predicate or re.compile(...) on variable.path.")
            routes.append({**entry, "optimizer": keras.saving.serialize_keras_object(opt)})
        return {"name": self.name, "routes": routes,
                "default": keras.saving.serialize_keras_object(self.default)}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        routes = [_route_from_config(r, f"routes[{i}]", custom_objects)
                  for i, r in enumerate(config.pop("routes", []))]
        default = keras.saving.deserialize_keras_object(config.pop("default"),
                                                        custom_objects=custom_objects)
        return cls(routes=routes, default=default, **config)


def _route_from_config(entry, argument, custom_objects=None):
    entry = dict(entry)
    optimizer = entry.pop("optimizer", None)
    if optimizer is None or len(entry) != 1 or not ({"predicate", "path"} & set(entry)):
        raise ValueError(f"RoutingOptimizer: `{argument}` must be "
                         "{'predicate': NAME or 'path': REGEX, 'optimizer': ...}, "
                         f"got keys {sorted(entry) + (['optimizer'] if optimizer else [])}.")
    rule = entry["predicate"] if "predicate" in entry else re.compile(entry["path"])
    if isinstance(optimizer, dict):
        optimizer = keras.saving.deserialize_keras_object(optimizer, custom_objects=custom_objects)
    return rule, optimizer
