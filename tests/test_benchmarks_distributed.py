"""Issue #12 item 6: every benchmark runs end to end on two replicas at ``--tiny`` scale.

Exactly the documented commands, one subprocess per strategy running them all:

    python -m benchmarks all --tiny --strategy mirrored        # TensorFlow, 2 logical CPUs
    python -m benchmarks all --tiny --strategy data_parallel   # JAX, 2 host devices

(the harness splits a lone CPU in two for ``mirrored``; JAX gets two host
devices from ``XLA_FLAGS=--xla_force_host_platform_device_count=2``). Each
parametrized test reads its benchmark's line of the run's summary and its
``results.json`` (which records the strategy and the replica count).
"""

import json
import os
import pathlib
import subprocess
import sys

import keras
import pytest

import kquant.benchmarks

BACKEND = keras.backend.backend()
NAMES = kquant.benchmarks.names()
ROOT = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run_all(strategy, backend, out_dir, extra_env=None):
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3", **(extra_env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "all", "--tiny", "--strategy", strategy,
         "--out-dir", str(out_dir)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=1500)
    lines = proc.stderr.split("Summary:\n", 1)
    assert len(lines) == 2, f"no summary (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    status = {}
    for line in lines[1].splitlines():
        name, sep, rest = line.strip().partition(": ")
        if sep and name in NAMES:
            status[name] = rest
    return status, proc.stderr, out_dir


@pytest.fixture(scope="module")
def mirrored_run(tmp_path_factory):
    return _run_all("mirrored", "tensorflow", tmp_path_factory.mktemp("mirrored"))


@pytest.fixture(scope="module")
def data_parallel_run(tmp_path_factory):
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip()
    return _run_all("data_parallel", "jax", tmp_path_factory.mktemp("data_parallel"),
                    {"XLA_FLAGS": flags})


def _check(run, name, strategy):
    status, stderr, out_dir = run
    assert name in status, f"{name} missing from the summary:\n{stderr[-3000:]}"
    if status[name].startswith("skipped"):   # a plugin that is not installed
        pytest.skip(status[name])
    assert status[name].startswith("ok"), f"{name}: {status[name]}\n{stderr[-3000:]}"
    env = json.loads((out_dir / name / "results.json").read_text())["meta"]["environment"]
    assert env["strategy"] == strategy and env["replicas"] == 2, env


@pytest.mark.tf_only
@pytest.mark.parametrize("name", NAMES)
def test_benchmark_runs_under_mirrored_strategy(mirrored_run, name):
    _check(mirrored_run, name, "mirrored")


@pytest.mark.distributed
@pytest.mark.skipif(BACKEND != "jax", reason="the data_parallel run belongs to the JAX pass")
@pytest.mark.parametrize("name", NAMES)
def test_benchmark_runs_under_jax_data_parallel(data_parallel_run, name):
    _check(data_parallel_run, name, "data_parallel")
