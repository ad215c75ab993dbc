"""The maniquant benchmark trains what its rows say (issue #10): each row's quantizer,
estimator, χ and latent box read back from the trained layers."""

import pytest

from kquant.benchmarks import maniquant as bench
from kquant.benchmarks.common import BenchConfig


@pytest.mark.slow
def test_tiny_run_rows_trained_their_labelled_configuration(tmp_path):
    result = bench.run(BenchConfig(tiny=True, batch_size=64, seed=0, out_dir=str(tmp_path)))
    rows = {r["estimator"]: r for r in result.rows}
    assert list(rows) == list(bench.VARIANTS) == ["ste", "wcg_chi0", "wcg"]
    trained = result.meta["trained"]
    for name, (estimator, config, unit_box) in bench.VARIANTS.items():
        got = trained[name]
        assert got["quantizers"] == ["DoReFa-2"], name
        assert got["estimators"] == [{"ste": "STE", "wcg": "WCG"}[estimator]], name
        assert got["constraints"] == (["UnitClip"] if unit_box else ["NoneType"]), name
        assert got["float_layers"], "first and last layers stay float"
        if unit_box:
            assert got["max_abs_latent"] <= 1.0, name
    assert trained["wcg_chi0"]["chi"] == [0.0]
    assert all(chi > 0 for chi in trained["wcg"]["chi"])   # 1/out_channels per layer
    # each row trained differently from STE (not a copy of it)
    assert rows["ste"]["weights_distance_to_ste"] == 0.0
    assert rows["wcg_chi0"]["weights_distance_to_ste"] > 1e-6
    assert rows["wcg"]["weights_distance_to_ste"] > 1e-6
