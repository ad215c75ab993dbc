"""ALQ across replicas: MirroredStrategy (2 logical CPUs) and JAX DataParallel (2 host devices).

One subprocess per strategy runs the ALQ pipeline (pruning, bases and
coordinates phases, an ALQActivation) at a global batch of 32 on 2 replicas,
sets the phase inside the scope, and runs ``alq --tiny`` of the benchmark
suite under the strategy; its weights and predictions must equal a
single-device run computed in a separate, undistributed process.
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from kquant.testing import run_on_two_cpus, run_on_two_jax_devices

BACKEND = keras.backend.backend()
TESTS = os.path.dirname(os.path.abspath(__file__))

_PIPELINE = """
import json, sys
import keras
import numpy as np
from kquant.alq import ALQ, alq_layers, fit_pipeline

OUT = sys.argv[1] if len(sys.argv) > 1 else {out!r}
MODE = {mode!r}

sys.path.insert(0, {tests!r})   # tests/alq_toys.py: the toy task and model the ALQ tests share
from alq_toys import toy_data, toy_model as build

x, y = toy_data(128)


def scope():
    import contextlib
    if MODE == "mirrored":  # the benchmark harness' (cached) strategy: one per process
        from kquant.benchmarks.common import get_strategy, num_replicas
        strategy = get_strategy("mirrored")
        assert num_replicas(strategy) == 2
        return strategy.scope()
    return contextlib.nullcontext()


with scope():
    model = build()
    optimizer = ALQ(1e-2)
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=MODE in ("jax", "data_parallel"))
    optimizer.phase = "coordinates"  # a phase set inside the scope (issue #12)
    assert optimizer.phase == "coordinates"
    _, schedule = fit_pipeline(model, x, y, batch_size=32, rounds=2, prune_epochs=1,
                               bases_epochs=1, coordinates_epochs=1, bases_lr=1e-2,
                               coordinates_lr=1e-2, ratio=0.6, verbose=0, shuffle=False)
result = {{"weights": [np.asarray(keras.ops.convert_to_numpy(w), "float64").tolist()
                       for w in model.weights],
           "predictions": np.asarray(model.predict(x, verbose=0), "float64").tolist(),
           "bits": [r["average_bits"] for r in schedule.log],
           "skipped": optimizer.non_finite_steps}}
if MODE in ("mirrored", "data_parallel"):
    from kquant.benchmarks import BenchConfig, run_benchmark
    res, folder = run_benchmark("alq", BenchConfig(tiny=True, strategy=MODE, out_dir=OUT + "_bench"))
    meta = json.loads((folder / "results.json").read_text())["meta"]
    result["bench_replicas"] = meta["environment"].get("replicas")
    result["bench_rows"] = len(res.rows)
    # The rows are what their labels say: the configured epochs and rounds were trained.
    settings = meta["settings"]
    result["bench_trained_as_configured"] = (
        meta["float_epochs_trained"] == settings["float_epochs"]
        and meta["alq_epochs_trained"] == meta["planned_alq_epochs"]
        == settings["rounds"] * (settings["prune_epochs"] + settings["bases_epochs"]
                                 + settings["coordinates_epochs"])
        and sum(r["stage"].startswith("round ") for r in res.rows) == settings["rounds"])
with open(OUT, "w") as f:
    json.dump(result, f)
"""


def _reference(tmp_path, backend, mode):
    """The single-device run, in a process with no CPU split and no distribution."""
    out = str(tmp_path / "reference.json")
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "force_host_platform_device_count" not in f)
    script = textwrap.dedent(_PIPELINE.format(tests=TESTS, out=out, mode=mode))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    with open(out) as f:
        return json.load(f)


def _compare(single, multi):
    assert multi["bits"] == single["bits"]
    assert single["bits"][-1] < single["bits"][0] < 3.0  # it did prune, twice
    assert len(multi["weights"]) == len(single["weights"])
    for a, b in zip(single["weights"], multi["weights"]):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(multi["predictions"]), np.asarray(single["predictions"]),
                               atol=1e-4, rtol=1e-4)
    assert multi["skipped"] == single["skipped"] == 0
    assert multi["bench_replicas"] == 2 and multi["bench_rows"] > 3
    assert multi["bench_trained_as_configured"]


@pytest.mark.tf_only
def test_mirrored_pipeline_equals_one_device(tmp_path):
    single = _reference(tmp_path, "tensorflow", "single")
    out = str(tmp_path / "mirrored.json")
    done = run_on_two_cpus(_PIPELINE.format(tests=TESTS, out=out, mode="mirrored"), timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    with open(out) as f:
        _compare(single, json.load(f))


@pytest.mark.distributed
@pytest.mark.skipif(BACKEND != "jax", reason="runs in the JAX pass of the suite")
def test_jax_data_parallel_pipeline_equals_one_device(tmp_path):
    single = _reference(tmp_path, "jax", "jax")
    out = str(tmp_path / "data_parallel.json")
    done = run_on_two_jax_devices(_PIPELINE.format(tests=TESTS, out=out, mode="data_parallel"), timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    with open(out) as f:
        _compare(single, json.load(f))
