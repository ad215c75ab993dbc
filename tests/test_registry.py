"""Plugin discovery: built-ins, a third-party plugin, a broken one, unknown names."""

import sys
import textwrap

import pytest
from keras import ops

import kquant
from kquant import estimators
from kquant.registry import UnknownNameError

pytestmark = pytest.mark.core  # backend-agnostic core: also run on torch


@pytest.fixture
def fake_plugins(tmp_path, monkeypatch):
    """Install (by dist-info on sys.path) one good and one broken estimator plugin."""
    pkg = tmp_path / "thirdparty_est"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent('''
        from keras import ops
        from kquant.estimators import ElementwiseEstimator

        class Triangle(ElementwiseEstimator):
            """Triangle surrogate: F'(s) = max(0, 1 - |s|/2) (a third-party test plugin)."""

            def derivative(self, s):
                return ops.maximum(0.0, 1.0 - ops.abs(s) / 2.0)
    '''))
    dist = tmp_path / "thirdparty_est-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-est\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent("""
        [kquant.estimators]
        triangle = thirdparty_est:Triangle
        broken = thirdparty_est_missing_module:Nope
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    estimators.registry.reload()
    yield
    monkeypatch.undo()
    sys.modules.pop("thirdparty_est", None)
    estimators.registry.reload()


def test_builtins_are_entry_points_of_kquant():
    info = {p.name: p for p in estimators.registry.info()}
    for name in ("ste", "clipped_ste", "mad", "htge", "dsq", "ede", "approx_sign", "swish_sign"):
        assert info[name].package == "kquant"
        assert info[name].description
    assert set(kquant.quantizers.available()) >= {"sign", "bwn", "dorefa", "uniform"}


def test_third_party_plugin_is_found_and_broken_one_isolated(fake_plugins):
    with pytest.warns(RuntimeWarning, match="broken"):
        names = estimators.available()
    assert "triangle" in names and "ste" in names
    assert names["triangle"].startswith("Triangle surrogate")
    assert "broken" not in names
    assert "thirdparty_est_missing_module" in estimators.registry.failures["broken"]
    info = {p.name: p.package for p in estimators.registry.info()}
    assert info["triangle"] == "thirdparty-est"
    # usable in a real layer, and serializable by its registered name
    layer = kquant.QuantDense(2, kernel_quantizer="sign", estimator="triangle")
    layer.build((None, 3))
    assert estimators.serialize(layer.kernel_quantizer.estimator) == {"name": "triangle",
                                                                      "config": {}}
    s = ops.convert_to_tensor([0.0, 1.0, 3.0])
    assert ops.convert_to_numpy(layer.kernel_quantizer.estimator.derivative(s)).tolist() == [
        1.0, 0.5, 0.0]
    with pytest.raises(UnknownNameError, match="failed to load"):
        estimators.get("broken")


def test_unknown_name_lists_installed_and_known_provider():
    with pytest.raises(UnknownNameError) as err:
        estimators.get("no_such_estimator")
    message = str(err.value)
    assert "Installed estimators:" in message
    for name in estimators.available():
        assert name in message
    if "ewgs" not in estimators.available():
        with pytest.raises(UnknownNameError, match="kquant-ewgs"):
            estimators.get("ewgs")


@pytest.mark.parametrize("name", sorted(estimators.available()))
def test_every_entry_point_round_trips_by_name(name):
    est = estimators.get(name)
    config = estimators.serialize(est)
    # aliases (two names, one class) serialize under one of them
    assert estimators.registry.get_class(config["name"]) is estimators.registry.get_class(name)
    again = estimators.get(config)
    assert type(again) is type(est) and again.get_config() == est.get_config()


@pytest.mark.parametrize("name", sorted(kquant.quantizers.available()))
def test_every_quantizer_entry_point_round_trips_by_name(name):
    q = kquant.quantizers.get(name)
    config = kquant.quantizers.serialize(q)
    assert kquant.quantizers.registry.get_class(config["name"]) is type(q)
    again = kquant.quantizers.get(config)
    assert type(again) is type(q) and again.get_config() == q.get_config()
