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


# -- hardening: collisions, qualified names, non-classes, SystemExit, optimizers -----------
PLUGIN_MODULE = '''
import sys
import keras
from keras import ops
from kquant.estimators import ElementwiseEstimator

class FakeSTE(ElementwiseEstimator):
    """A third-party 'ste' (slope 0.25 everywhere)."""

    def derivative(self, s):
        return ops.full_like(s, 0.25)

class OtherSTE(ElementwiseEstimator):
    """Another third-party 'ste' (slope 0.5 everywhere)."""

    def derivative(self, s):
        return ops.full_like(s, 0.5)

NOT_A_CLASS = 3

class NotAnEstimator:
    """A class of the wrong base."""

@keras.saving.register_keras_serializable("thirdparty")
class HalfSGD(keras.optimizers.SGD):
    """SGD at half the given learning rate (a third-party test optimizer)."""

    def __init__(self, learning_rate=0.1, **kwargs):
        super().__init__(learning_rate=learning_rate / 2, **kwargs)
        self.requested = learning_rate

    def get_config(self):
        return {**super().get_config(), "learning_rate": self.requested}
'''


def _make_distribution(root, dist, module, entry_points, source=PLUGIN_MODULE):
    """A distribution on ``root`` (a dist-info folder with METADATA and entry_points.txt)."""
    (root / f"{module}.py").write_text(source)
    info = root / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    sections = "".join(f"[{group}]\n" + "".join(f"{line}\n" for line in lines)
                       for group, lines in entry_points.items())
    (info / "entry_points.txt").write_text(sections)


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """``installed(dist, module, {group: ["name = module:Attr", ...]})`` puts a distribution
    on sys.path; every registry is rescanned, and restored afterwards."""
    registries = [estimators.registry, kquant.quantizers.registry, kquant.optimizers.registry]

    def install(dist, module, entry_points, source=PLUGIN_MODULE):
        root = tmp_path / dist
        root.mkdir()
        _make_distribution(root, dist, module, entry_points, source)
        monkeypatch.syspath_prepend(str(root))
        for r in registries:
            r.reload()

    modules = set(sys.modules)
    yield install
    monkeypatch.undo()
    for name in set(sys.modules) - modules:
        if name.startswith("tp_"):
            sys.modules.pop(name)
    for r in registries:
        r.reload()


def test_third_party_duplicate_never_replaces_a_builtin(installed, tmp_path):
    from kquant.estimators.ste import STE

    installed("evil-dist", "tp_evil", {"kquant.estimators": ["ste = tp_evil:FakeSTE"]})
    with pytest.warns(RuntimeWarning, match=r"'ste' is provided by .*kquant.*evil-dist"):
        names = estimators.available()
    assert estimators.registry.get_class("ste") is STE
    fake = estimators.registry.get_class("evil-dist:ste")
    assert fake.__name__ == "FakeSTE" and "evil-dist:ste" in names
    assert estimators.registry.get_class("Evil_Dist:STE") is fake  # PEP 503 spelling
    assert estimators.registry.get_class("kquant:ste") is STE
    assert estimators.registry.collisions["ste"] == ["kquant (kquant.estimators.ste:STE)",
                                                     "evil-dist (tp_evil:FakeSTE)"]
    # a qualified name works in a layer config and is what the layer saves
    import keras
    import numpy as np

    model = keras.Sequential([keras.Input((3,)), kquant.QuantDense(
        2, kernel_quantizer="sign", estimator="evil-dist:ste")])
    est = model.layers[0].kernel_quantizer.estimator
    assert type(est) is fake
    assert estimators.serialize(est) == {"name": "evil-dist:ste", "config": {}}
    path = str(tmp_path / "qualified.keras")
    model.save(path)
    again = keras.saving.load_model(path)
    assert type(again.layers[0].kernel_quantizer.estimator) is fake
    x = np.random.default_rng(0).normal(size=(4, 3)).astype("float32")
    np.testing.assert_array_equal(again.predict(x, verbose=0), model.predict(x, verbose=0))


def test_two_third_party_duplicates_make_the_plain_name_ambiguous(installed):
    from kquant.registry import AmbiguousNameError

    installed("first-dist", "tp_first", {"kquant.estimators": ["shared = tp_first:FakeSTE"]})
    installed("second-dist", "tp_second", {"kquant.estimators": ["shared = tp_second:OtherSTE"]})
    with pytest.warns(RuntimeWarning, match="first-dist.*second-dist|second-dist.*first-dist"):
        names = estimators.available()
    assert "shared" not in names
    assert {"first-dist:shared", "second-dist:shared"} <= set(names)
    with pytest.raises(AmbiguousNameError, match="'first-dist:shared'"):
        estimators.get("shared")
    assert type(estimators.get("second-dist:shared")).__name__ == "OtherSTE"


def test_non_class_wrong_base_and_system_exit_are_rejected_at_discovery(installed):
    installed("bad-dist", "tp_bad", {
        "kquant.estimators": ["number = tp_bad:NOT_A_CLASS", "plain = tp_bad:NotAnEstimator",
                              "exits = tp_exit:Anything"],
        "kquant.optimizers": ["not_optimizer = tp_bad:FakeSTE"],
    })
    root = sys.path[0]
    with open(f"{root}/tp_exit.py", "w") as f:
        f.write("import sys\nsys.exit('plugin refuses to load')\n")
    with pytest.warns(RuntimeWarning, match="failed to load"):
        names = estimators.available()
    assert not {"number", "plain", "exits"} & set(names)
    failures = estimators.registry.failures
    assert "is a int (3), not a subclass of kquant.estimators.base.Estimator" in failures["number"]
    assert "the class tp_bad.NotAnEstimator, not a subclass" in failures["plain"]
    assert "SystemExit(plugin refuses to load)" in failures["exits"]
    with pytest.raises(UnknownNameError, match="failed to load: TypeError"):
        estimators.get("number")
    with pytest.warns(RuntimeWarning):
        assert "not_optimizer" not in kquant.optimizers.available()
    assert "keras.src.optimizers" in kquant.optimizers.registry.failures["not_optimizer"]


def test_a_third_party_optimizer_plugin_is_found_and_used_by_name(installed):
    import keras
    import numpy as np

    installed("tp-opt", "tp_opt", {"kquant.optimizers": ["half_sgd = tp_opt:HalfSGD",
                                                         "adam = tp_opt:HalfSGD"]})
    info = {p.name: p for p in kquant.optimizers.registry.info()}
    assert info["half_sgd"].package == "tp-opt"
    assert info["half_sgd"].description.startswith("SGD at half")
    opt = kquant.optimizers.get("half_sgd", learning_rate=0.2)
    w = keras.Variable(np.ones(3, "float32"))
    opt.apply([keras.ops.ones(3)], [w])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(w), 0.9)  # 1 - 0.1 * 1
    again = kquant.optimizers.get(kquant.optimizers.serialize(opt))
    assert type(again) is type(opt) and again.get_config() == opt.get_config()
    # a plugin never replaces Keras' own names; its qualified name reaches it
    with pytest.warns(RuntimeWarning, match="'adam' of tp-opt is shadowed by Keras' 'adam'"):
        assert isinstance(kquant.optimizers.get("adam"), keras.optimizers.Adam)
    assert type(kquant.optimizers.get("tp-opt:adam")) is type(opt)


# wrappers need a child; every other optimizer is built with its defaults
OPTIMIZER_ARGS = {
    "skip_non_finite": {"inner_optimizer": "adam"},
    "routing": {"routes": [("binary_kernels", "bop")], "default": "sgd"},
}


@pytest.mark.parametrize("name", sorted(kquant.optimizers.available()))
def test_every_optimizer_entry_point_round_trips_by_name(name):
    import keras

    opt = kquant.optimizers.get(name, **OPTIMIZER_ARGS.get(name, {}))
    config = kquant.optimizers.serialize(opt)
    assert kquant.optimizers.registry.get_class(config["name"]) is type(opt)
    again = kquant.optimizers.get(config)
    assert type(again) is type(opt) and again.get_config() == opt.get_config()
    # and the Keras form a saved model holds
    keras_form = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(opt))
    assert type(keras_form) is type(opt) and keras_form.get_config() == opt.get_config()
