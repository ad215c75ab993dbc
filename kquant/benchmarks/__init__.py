"""kquant's benchmark suite: the papers' experiments, reproducible on CPU, GPU or TPU.

A benchmark is a module ``kquant/benchmarks/<name>.py`` exposing
``run(cfg: BenchConfig) -> Result`` (see :mod:`kquant.benchmarks.common`).
It ships inside the package: ``kquant bench NAME`` (or ``python -m
kquant.benchmarks NAME``; ``python -m benchmarks NAME`` from the repository
root) runs it anywhere; ``all`` runs every one. Results go to
``OUT_DIR/<name>/`` (JSON, markdown table, PNG plot); the repository's
committed results are in ``benchmarks/results/``.
"""

from __future__ import annotations

import importlib
import pkgutil

# ``common`` imports Keras and a backend: loaded on first use, so that listing
# the benchmarks (``kquant bench --list``) stays instant.
_COMMON_NAMES = ("BenchConfig", "MissingPlugin", "Result")


def __getattr__(name):
    if name == "common" or name in _COMMON_NAMES:
        common = importlib.import_module("kquant.benchmarks.common")
        return common if name == "common" else getattr(common, name)
    raise AttributeError(f"module 'kquant.benchmarks' has no attribute {name!r}")

NOT_BENCHMARKS = {"common"}


def names() -> list[str]:
    """Benchmark modules present in this package (whether or not their plugins are installed)."""
    return sorted(
        m.name for m in pkgutil.iter_modules(__path__)
        if not m.name.startswith("_") and not m.name.startswith("test") and m.name not in NOT_BENCHMARKS
    )


def load(name: str):
    """The module of benchmark ``name``; a clear error for an unknown one."""
    if name not in names():
        raise ValueError(f"Unknown benchmark {name!r}; available: {', '.join(names()) or '(none)'}, all.")
    module = importlib.import_module(f"kquant.benchmarks.{name}")
    if not callable(getattr(module, "run", None)):
        raise ValueError(f"kquant/benchmarks/{name}.py has no run(cfg) -> Result function.")
    return module


def is_missing_plugin(error: BaseException) -> bool:
    """Whether ``error`` means "a plugin this benchmark needs is not installed"."""
    from kquant.benchmarks.common import MissingPlugin
    from kquant.registry import UnknownNameError

    return isinstance(error, (MissingPlugin, UnknownNameError, ModuleNotFoundError))


# ``-o`` settings every benchmark takes (read by the harness, not by ``run``)
COMMON_OPTIONS = {"tpu": "TPU address for --strategy tpu (else $TPU_NAME, else local)"}


def options(name: str) -> dict[str, str]:
    """The ``-o KEY=VALUE`` settings benchmark ``name`` reads (its module's ``OPTIONS``,
    setting → one-line help) and those every benchmark takes."""
    return {**COMMON_OPTIONS, **getattr(load(name), "OPTIONS", {})}


def check_options(chosen, given) -> None:
    """Refuse, before anything runs, an ``-o`` key that none of the ``chosen`` benchmarks
    reads (a typo would otherwise train for minutes on the defaults)."""
    known = dict(COMMON_OPTIONS)
    for name in chosen:
        try:
            known.update(options(name))
        except Exception:  # noqa: BLE001 - a module that cannot load fails (and is reported) when run
            continue
    unknown = [key for key in given if key not in known]
    if unknown:
        names = ", ".join(chosen)
        raise ValueError(
            f"unknown option(s) {', '.join(repr(k) for k in unknown)} for {names}; "
            f"it takes: {', '.join(f'{k} ({v})' for k, v in sorted(known.items()))}.")


def run_benchmark(name: str, cfg: BenchConfig, command: str | None = None):
    """Run one benchmark inside the configured strategy and write its results.

    Returns ``(result, folder)``.
    """
    from kquant.benchmarks import common

    module = load(name)
    common.set_seed(cfg.seed)
    with common.strategy_scope(cfg):
        result = module.run(cfg)
        folder = common.write_result(result, cfg, command)
    return result, folder


__all__ = ["BenchConfig", "COMMON_OPTIONS", "MissingPlugin", "Result", "check_options",
           "is_missing_plugin", "load", "names", "options", "run_benchmark"]
