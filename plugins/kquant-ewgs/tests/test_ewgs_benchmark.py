"""The ewgs benchmark trains what its rows say (issue #10: the fixed-δ row used to
train δ = 0, copied from the STE model by ``set_weights``)."""

import keras
import numpy as np
import pytest
from keras import ops

from kquant.benchmarks import ewgs as bench
from kquant_ewgs import EWGS, ewgs_estimators


def _models():
    made = {}
    for name, (delta, adaptive) in bench.VARIANTS.items():
        keras.utils.set_random_seed(0)
        made[name] = bench._model((8, 8, 1), 10, 2, 4, lambda d=delta, a=adaptive: EWGS(d, a))
    return made


def test_same_start_keeps_each_rows_delta():
    models = _models()
    start = models["ste"].get_weights()
    plain = _models()["ewgs_fixed_1e-3"]
    plain.set_weights(start)     # the old copy: δ comes from the STE model
    assert bench.trained_deltas(plain) == [0.0]
    for name, model in models.items():
        bench.same_start(model, start)
        delta, adaptive = bench.VARIANTS[name]
        assert bench.trained_deltas(model) == [pytest.approx(delta)], name
        assert all(e.adaptive == adaptive for e in ewgs_estimators(model))
        # every other weight is the STE model's
        for v, s in zip(model.weights, start):
            if not v.path.endswith("delta"):
                np.testing.assert_array_equal(ops.convert_to_numpy(v), s, err_msg=v.path)


@pytest.mark.slow
def test_tiny_run_rows_trained_their_labelled_delta(tmp_path):
    """Every row trains its own δ. Judged on the weights, not the loss: at tiny scale
    (4 steps) fixed δ = 1e-3 moves the latent weights (~1e-4) without flipping a
    quantized level, so on JAX the loss equals STE's to the last bit."""
    from kquant.benchmarks.common import BenchConfig

    result = bench.run(BenchConfig(tiny=True, batch_size=64, seed=0, out_dir=str(tmp_path)))
    rows = {r["estimator"]: r for r in result.rows}
    assert set(rows) == set(bench.VARIANTS)
    assert rows["ste"]["delta_trained"] == [0.0]
    assert rows["ewgs_fixed_1e-3"]["delta_trained"] == [pytest.approx(1e-3)]
    assert rows["ewgs_fixed_1e-3"]["weights_distance_to_ste"] > 1e-6   # not STE again
    assert rows["ewgs_adaptive"]["delta_refreshes"] >= 1
    assert result.meta["delta_refresh"]["samples"] >= 1
