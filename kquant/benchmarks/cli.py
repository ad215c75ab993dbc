"""Start-up time of the command line: ``kquant --help`` and ``import kquant``.

Each command runs in a fresh interpreter, timed from the outside: ``kquant --help``
is the installed console script beside this interpreter (``python -m kquant.cli
--help``, the same start-up, where none is installed), and must import neither
Keras nor a backend (the row says which it imported; the package and the CLI
import lazily); ``import kquant`` registers kquant's Keras-serializable classes
(so that ``keras.saving.load_model`` works after it) and so loads Keras and the
backend by design. Runs: 1 (tiny: a smoke test), 10 (quick), 30 (full); ``kquant estimators``
(which loads Keras and the backend) only at ``--full`` or with
``-o estimators=true``.
"""

from __future__ import annotations

import os
import pathlib
import statistics
import subprocess
import sys
import time

from kquant.benchmarks.common import Result

# the -o KEY=VALUE settings this benchmark reads (others are refused)
OPTIONS = {
    "runs": "start-up runs per command",
    "estimators": "also time `kquant estimators` (imports Keras)",
}

HEAVY = ("keras", "tensorflow", "jax", "torch")

def console_script() -> list[str]:
    """The ``kquant`` console script installed beside this interpreter, or, where there
    is none (a source checkout on ``PYTHONPATH``), ``python -m kquant.cli``."""
    for name in ("kquant", "kquant.exe"):
        script = pathlib.Path(sys.executable).parent / name
        if script.is_file():
            return [str(script)]
    return [sys.executable, "-m", "kquant.cli"]


COMMANDS = {
    "kquant --help": [*console_script(), "--help"],
    "import kquant": [sys.executable, "-c", "import kquant"],
    "kquant estimators": [*console_script(), "estimators"],
}

def _time(argv, runs):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, env=env)
        times.append(time.perf_counter() - t0)
    return times


def heavy_modules_at_help() -> list[str]:
    """Heavy modules (Keras, backends) that the timed ``kquant --help`` command imports
    (should be none), read from ``python -X importtime`` running that same command."""
    argv = COMMANDS["kquant --help"]
    imported = imported_packages(argv[1:] if argv[0] == sys.executable else argv)
    return [m for m in HEAVY if m in imported]


def imported_packages(args) -> set[str]:
    """Top-level packages that ``python -X importtime ARGS`` (a script or ``-m MODULE``
    with its arguments) imports, from the timings it writes to stderr."""
    out = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True,
                         text=True, check=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    return {line.rsplit("|", 1)[-1].strip().split(".")[0]
            for line in out.stderr.splitlines() if line.startswith("import time:")}


def run(cfg):
    runs = int(cfg.option("runs", 1 if cfg.tiny else 10 if cfg.quick else 30))
    if runs < 1:
        raise ValueError(f"cli: option `runs` must be at least 1, got {runs}.")
    commands = dict(COMMANDS)
    if not cfg.option("estimators", not (cfg.tiny or cfg.quick)):
        # `kquant estimators` imports Keras and a backend (seconds a run): --full or -o estimators=true
        commands.pop("kquant estimators")
    heavy = heavy_modules_at_help()
    rows = []
    for label, argv in commands.items():
        times = _time(argv, runs)
        rows.append({"command": label, "median_s": statistics.median(times), "min_s": min(times),
                     "max_s": max(times), "runs": runs, "argv": " ".join(
                         pathlib.Path(argv[0]).name if i == 0 else a for i, a in enumerate(argv))})
    return Result(
        "cli", rows,
        meta={"heavy_modules_imported_by_help": heavy,
              "note": "wall time of a fresh interpreter per run, start-up included"},
        columns=["command", "argv", "median_s", "min_s", "max_s", "runs"],
    )
