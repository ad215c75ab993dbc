"""Plugin discovery: entry points found at run time with stevedore.

kquant's own estimators, quantizers and optimizers are registered in its
``pyproject.toml`` under the same entry-point groups a third-party package
uses (``kquant.estimators``, ``kquant.quantizers``, ``kquant.optimizers``),
so built-ins and plugins are found by one mechanism.

Rules, applied when a group is scanned:

* A plugin whose import fails — with any exception, ``SystemExit`` included
  (only ``KeyboardInterrupt`` passes through) — is recorded in
  :attr:`Registry.failures` (name and cause) and never stops the others.
* An entry point that is not a class of the group's base (``Estimator``,
  ``Quantizer``, ``keras.optimizers.Optimizer``) is rejected the same way.
* Every plugin is reachable by its qualified name ``distribution:name``
  (``"kquant:ste"``). A plain name provided by two distributions with
  different classes is reported in a warning naming both: if kquant is one
  of them, the plain name stays kquant's built-in; otherwise the plain name
  is ambiguous and refused. The others are listed, and serialize, under their
  qualified names only, so a saved model reloads the class it was saved with.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import inspect
import re
import threading
import warnings

from stevedore import ExtensionManager


class UnknownNameError(ValueError):
    """Raised for a name no installed plugin provides."""


class AmbiguousNameError(UnknownNameError):
    """Raised for a plain name that two third-party distributions provide."""


class PluginImportAborted(RuntimeError):
    """A plugin raised a ``BaseException`` (e.g. ``SystemExit``) at import."""


#: The distribution whose names always win a collision.
OWN_DISTRIBUTION = "kquant"

#: Base class every entry point of a group must subclass ("module:attribute",
#: imported on first scan so that the registry imports nothing heavy).
GROUP_BASES = {
    "kquant.estimators": "kquant.estimators.base:Estimator",
    "kquant.quantizers": "kquant.quantizers.base:Quantizer",
    "kquant.optimizers": "keras.optimizers:Optimizer",
}


@dataclasses.dataclass(frozen=True)
class PluginInfo:
    name: str
    cls: type
    package: str
    description: str
    target: str = ""


# Names provided by the separately installable packages under ``plugins/``;
# used only to make the error for a missing one say what to install.
KNOWN_PROVIDERS = {
    "ewgs": "kquant-ewgs (pip install ./plugins/kquant-ewgs)",
    "wcg": "kquant-maniquant (pip install ./plugins/kquant-maniquant)",
    "maniquant": "kquant-maniquant (pip install ./plugins/kquant-maniquant)",
    "metaquant": "kquant-metaquant (pip install ./plugins/kquant-metaquant)",
    "fcgrad": "kquant-metaquant (pip install ./plugins/kquant-metaquant)",
    "multifc": "kquant-metaquant (pip install ./plugins/kquant-metaquant)",
    "lstmfc": "kquant-metaquant (pip install ./plugins/kquant-metaquant)",
}


def canonical_distribution(name: str) -> str:
    """PEP 503 normal form: ``My_Plugin.x`` → ``my-plugin-x``."""
    return re.sub(r"[-_.]+", "-", str(name)).lower()


def _distributions_of(group: str) -> dict[tuple[str, str], list[str]]:
    """(entry-point name, value) -> distributions declaring it, in sys.path order."""
    owners: dict[tuple[str, str], list[str]] = {}
    for dist in importlib.metadata.distributions():
        try:
            eps = dist.entry_points.select(group=group)
            dist_name = canonical_distribution(dist.metadata["Name"])
        except Exception:  # a broken distribution must not hide the others
            continue
        for ep in eps:
            names = owners.setdefault((ep.name, ep.value), [])
            if dist_name not in names:
                names.append(dist_name)
    return owners


def _first_line(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _resolve(target):
    if not isinstance(target, str):
        return target
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def _describe(obj) -> str:
    if inspect.isclass(obj):
        return f"the class {obj.__module__}.{obj.__qualname__}"
    text = repr(obj)
    return f"a {type(obj).__name__} ({text[:60]}{'...' if len(text) > 60 else ''})"


class _IsolatingExtensionManager(ExtensionManager):
    """stevedore's manager, with ``BaseException`` at import turned into an error
    its failure callback sees (stevedore catches ``Exception`` only)."""

    def _load_one_plugin(self, ep, *args, **kwargs):
        try:
            return super()._load_one_plugin(ep, *args, **kwargs)
        except (Exception, KeyboardInterrupt):
            raise
        except BaseException as error:  # SystemExit, GeneratorExit, custom ones
            raise PluginImportAborted(
                f"{type(error).__name__}({error}) raised while importing {ep.value}"
            ) from error


class Registry:
    """The plugins of one entry-point group, loaded lazily and cached.

    Args:
        group: entry-point group (``"kquant.estimators"``).
        kind: what one plugin is called in messages (``"estimator"``).
        base: class (or ``"module:attribute"``) every plugin must subclass;
            defaults to :data:`GROUP_BASES` of the group.
    """

    def __init__(self, group: str, kind: str, base=None):
        self.group = group
        self.kind = kind
        self._base = base if base is not None else GROUP_BASES.get(group)
        self._plugins: dict[str, PluginInfo] | None = None
        self._qualified: dict[str, PluginInfo] = {}
        self._ambiguous: dict[str, list[str]] = {}
        self.failures: dict[str, str] = {}
        self.collisions: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    @property
    def base(self):
        """The class every plugin of this group must subclass (or ``None``)."""
        return _resolve(self._base)

    def _warn(self, message):
        warnings.warn(f"kquant: {message}", RuntimeWarning, stacklevel=4)

    def _load(self) -> dict[str, PluginInfo]:
        with self._lock:
            if self._plugins is None:
                self._scan()
            return self._plugins

    def _scan(self):
        raw_failures = []
        manager = _IsolatingExtensionManager(
            namespace=self.group,
            invoke_on_load=False,
            on_load_failure_callback=lambda _m, ep, error: raw_failures.append((ep, error)),
        )
        owners = _distributions_of(self.group)
        base = self.base
        # (distribution, name) -> info; the first occurrence in sys.path order wins
        # within one distribution (two copies of one package are not a collision).
        candidates: dict[tuple[str, str], PluginInfo] = {}
        failures: dict[tuple[str, str], str] = {}
        for ep, error in raw_failures:
            for dist in owners.get((ep.name, ep.value), ["?"]):
                failures.setdefault((dist, ep.name), f"{type(error).__name__}: {error}")
        for ext in manager.extensions:
            ep = ext.entry_point
            for dist in owners.get((ep.name, ep.value), ["?"]):
                if (dist, ext.name) in candidates or (dist, ext.name) in failures:
                    continue
                if base is not None and not (inspect.isclass(ext.plugin)
                                             and issubclass(ext.plugin, base)):
                    failures[(dist, ext.name)] = (
                        f"TypeError: entry point {ext.name} = {ep.value} is "
                        f"{_describe(ext.plugin)}, not a subclass of "
                        f"{base.__module__}.{base.__qualname__}"
                    )
                    continue
                candidates[(dist, ext.name)] = PluginInfo(
                    ext.name, ext.plugin, dist, _first_line(ext.plugin), ep.value)

        by_name: dict[str, list[PluginInfo]] = {}
        for info in candidates.values():
            by_name.setdefault(info.name, []).append(info)
        plugins, qualified, ambiguous, collisions = {}, {}, {}, {}
        for name, infos in by_name.items():
            infos.sort(key=lambda i: (i.package != OWN_DISTRIBUTION, i.package))
            for info in infos:
                qualified[f"{info.package}:{name}"] = dataclasses.replace(
                    info, name=f"{info.package}:{name}")
            classes = {info.cls for info in infos}
            if len(classes) == 1:
                own = [i for i in infos if i.package == OWN_DISTRIBUTION]
                plugins[name] = own[0] if own else infos[0]
                continue
            collisions[name] = [f"{i.package} ({i.target})" for i in infos]
            own = [i for i in infos if i.package == OWN_DISTRIBUTION]
            if own:
                plugins[name] = own[0]
                others = [i for i in infos if i.cls is not own[0].cls]
                self._warn(
                    f"{self.kind} name {name!r} is provided by {', '.join(collisions[name])}; "
                    f"{name!r} stays kquant's built-in, the other(s) are reachable only as "
                    f"{', '.join(repr(f'{i.package}:{name}') for i in others)}.")
            else:
                ambiguous[name] = [f"{i.package}:{name}" for i in infos]
                self._warn(
                    f"{self.kind} name {name!r} is provided by {', '.join(collisions[name])}; "
                    f"the plain name is ambiguous, use "
                    f"{' or '.join(repr(q) for q in ambiguous[name])}.")
            for info in infos:
                if info is not plugins.get(name):
                    plugins[f"{info.package}:{name}"] = qualified[f"{info.package}:{name}"]

        self.failures = {}
        for (dist, name), why in failures.items():
            key = name if name not in plugins and name not in ambiguous else f"{dist}:{name}"
            self.failures[key] = why
            self._warn(f"{self.kind} plugin {key!r} failed to load: {why}")
        self._qualified = qualified
        self._ambiguous = ambiguous
        self.collisions = collisions
        self._plugins = dict(sorted(plugins.items()))

    def reload(self) -> None:
        """Forget the cache; the next lookup scans the entry points again."""
        with self._lock:
            self._plugins = None
            # stevedore memoises entry points per namespace for the process.
            ExtensionManager.ENTRY_POINT_CACHE.pop(self.group, None)

    def names(self) -> list[str]:
        """Usable names: plain ones, and qualified ones for collision losers."""
        return list(self._load())

    def info(self) -> list[PluginInfo]:
        return list(self._load().values())

    def available(self) -> dict[str, str]:
        """Installed names mapped to their one-line descriptions."""
        return {name: p.description for name, p in self._load().items()}

    def get_class(self, plugin_name: str, /) -> type:
        """The class registered as ``plugin_name`` (plain or ``distribution:name``)."""
        plugins = self._load()
        name = plugin_name
        key = str(name).strip().lower()
        if ":" in key:
            dist, _, short = key.partition(":")
            key = f"{canonical_distribution(dist)}:{short}"
            if key in self._qualified:
                return self._qualified[key].cls
        elif key in plugins:
            return plugins[key].cls
        if key in self._ambiguous:
            raise AmbiguousNameError(
                f"{self.kind.capitalize()} {name!r} is provided by several distributions "
                f"({', '.join(self.collisions[key])}); use one of the qualified names "
                f"{', '.join(repr(q) for q in self._ambiguous[key])}.")
        message = (
            f"Unknown {self.kind} {name!r}. Installed {self.kind}s: "
            f"{', '.join(plugins) or '(none)'}."
        )
        if key in self.failures:
            message += f" The plugin {key!r} is installed but failed to load: {self.failures[key]}."
        elif key in KNOWN_PROVIDERS:
            message += f" {key!r} is provided by {KNOWN_PROVIDERS[key]}."
        raise UnknownNameError(message)

    def name_of(self, cls: type) -> str | None:
        """The name a class is saved under: its plain name, or ``distribution:name``
        when a collision left it reachable only that way."""
        for name, p in self._load().items():
            if p.cls is cls:
                return name
        return None

    def get(self, plugin_name: str, /, **kwargs):
        return self.get_class(plugin_name)(**kwargs)
