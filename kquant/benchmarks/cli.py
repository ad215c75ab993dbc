"""Start-up time of the command line: ``kquant --help`` and ``import kquant``.

Each command runs in a fresh interpreter (``python -m kquant.cli --help``,
``python -c "import kquant"``), timed from the outside; the row also says
whether Keras or a backend was imported (it must not be: the package and
the CLI import lazily). Runs: 3 (tiny), 10 (quick), 30 (full); ``kquant
estimators`` (which loads Keras and the backend) only at ``--full`` or with
``-o estimators=true``.
"""

from __future__ import annotations

import os
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

COMMANDS = {
    "kquant --help": [sys.executable, "-m", "kquant.cli", "--help"],
    "import kquant": [sys.executable, "-c", "import kquant"],
    "kquant estimators": [sys.executable, "-m", "kquant.cli", "estimators"],
}

_PROBE = ("import runpy, sys\n"
          "sys.argv = ['kquant', '--help']\n"
          "try:\n    runpy.run_module('kquant.cli', run_name='__main__')\n"
          "except SystemExit:\n    pass\n"
          "print('HEAVY=' + ','.join(m for m in {heavy!r} if m in sys.modules), file=sys.stderr)\n")


def _time(argv, runs):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, env=env)
        times.append(time.perf_counter() - t0)
    return times


def heavy_modules_at_help() -> list[str]:
    """Heavy modules (Keras, backends) imported by ``kquant --help`` (should be none)."""
    out = subprocess.run([sys.executable, "-c", _PROBE.format(heavy=HEAVY)],
                         capture_output=True, text=True, check=True)
    line = [x for x in out.stderr.splitlines() if x.startswith("HEAVY=")][-1]
    return [m for m in line[len("HEAVY="):].split(",") if m]


def run(cfg):
    runs = int(cfg.option("runs", 3 if cfg.tiny else 10 if cfg.quick else 30))
    commands = dict(COMMANDS)
    if not cfg.option("estimators", not (cfg.tiny or cfg.quick)):
        # `kquant estimators` imports Keras and a backend (seconds a run): --full or -o estimators=true
        commands.pop("kquant estimators")
    heavy = heavy_modules_at_help()
    rows = []
    for label, argv in commands.items():
        times = _time(argv, runs)
        rows.append({"command": label, "median_s": statistics.median(times), "min_s": min(times),
                     "max_s": max(times), "runs": runs})
    return Result(
        "cli", rows,
        meta={"heavy_modules_imported_by_help": heavy,
              "note": "wall time of a fresh interpreter per run, start-up included"},
        columns=["command", "median_s", "min_s", "max_s", "runs"],
    )
