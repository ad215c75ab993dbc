"""Plugin discovery: entry points found at run time with stevedore.

kquant's own estimators and quantizers are registered in its
``pyproject.toml`` under the same entry-point groups a third-party package
uses (``kquant.estimators``, ``kquant.quantizers``), so built-ins and plugins
are found by one mechanism. A plugin whose import fails is recorded in
:attr:`Registry.failures` (name and cause) and never stops the others.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect
import threading
import warnings

from stevedore import ExtensionManager


class UnknownNameError(ValueError):
    """Raised for a name no installed plugin provides."""


@dataclasses.dataclass(frozen=True)
class PluginInfo:
    name: str
    cls: type
    package: str
    description: str


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


def _distributions_of(group: str) -> dict[tuple[str, str], str]:
    """(entry-point name, value) -> name of the distribution declaring it."""
    owners = {}
    for dist in importlib.metadata.distributions():
        try:
            eps = dist.entry_points.select(group=group)
        except Exception:  # a broken distribution must not hide the others
            continue
        for ep in eps:
            owners[(ep.name, ep.value)] = dist.metadata["Name"]
    return owners


def _first_line(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


class Registry:
    """The plugins of one entry-point group, loaded lazily and cached."""

    def __init__(self, group: str, kind: str):
        self.group = group
        self.kind = kind
        self._plugins: dict[str, PluginInfo] | None = None
        self.failures: dict[str, str] = {}
        self._lock = threading.Lock()

    def _on_failure(self, manager, entry_point, error):
        self.failures[entry_point.name] = f"{type(error).__name__}: {error}"
        warnings.warn(
            f"kquant: {self.kind} plugin {entry_point.name!r} "
            f"({entry_point.value}) failed to load: {error}",
            RuntimeWarning,
            stacklevel=2,
        )

    def _load(self) -> dict[str, PluginInfo]:
        with self._lock:
            if self._plugins is None:
                self.failures = {}
                manager = ExtensionManager(
                    namespace=self.group,
                    invoke_on_load=False,
                    on_load_failure_callback=self._on_failure,
                )
                owners = _distributions_of(self.group)
                plugins = {}
                for ext in manager.extensions:
                    ep = ext.entry_point
                    package = owners.get((ep.name, ep.value), "?")
                    plugins[ext.name] = PluginInfo(
                        ext.name, ext.plugin, package, _first_line(ext.plugin)
                    )
                self._plugins = dict(sorted(plugins.items()))
            return self._plugins

    def reload(self) -> None:
        """Forget the cache; the next lookup scans the entry points again."""
        with self._lock:
            self._plugins = None
            # stevedore memoises entry points per namespace for the process.
            ExtensionManager.ENTRY_POINT_CACHE.pop(self.group, None)

    def names(self) -> list[str]:
        return list(self._load())

    def info(self) -> list[PluginInfo]:
        return list(self._load().values())

    def available(self) -> dict[str, str]:
        """Installed names mapped to their one-line descriptions."""
        return {name: p.description for name, p in self._load().items()}

    def get_class(self, plugin_name: str, /) -> type:
        plugins = self._load()
        name = plugin_name
        key = str(name).lower()
        if key in plugins:
            return plugins[key].cls
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
        """The registered name of a class (or of one of its bases)."""
        for name, p in self._load().items():
            if p.cls is cls:
                return name
        return None

    def get(self, plugin_name: str, /, **kwargs):
        return self.get_class(plugin_name)(**kwargs)
