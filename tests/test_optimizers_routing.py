"""RoutingOptimizer (per-variable optimizers), ``for_training`` and the CLI commands."""

import re

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from keras import ops

import kquant
from kquant.cli import main
from kquant.optimizers import Bop, RoutingOptimizer, mark_binary

pytestmark = pytest.mark.core


def _np(v):
    return ops.convert_to_numpy(v)


def _variables():
    binary = mark_binary(keras.Variable(np.ones(4, "float32"), name="kernel"))
    head = keras.Variable(np.ones(2, "float32"), name="head_bias")
    other = keras.Variable(np.ones(3, "float32"), name="gamma")
    return binary, head, other


def test_each_variable_is_trained_by_its_route_only():
    binary, head, other = _variables()
    opt = RoutingOptimizer(
        [("binary_kernels", Bop(threshold=0.0, gamma=1.0)),
         (re.compile(r"head_"), keras.optimizers.SGD(0.5))],
        default=keras.optimizers.SGD(0.25))
    assert [opt.route_of(v) for v in (binary, head, other)] == [0, 1, 2]
    grads = [ops.full((4,), 0.1), ops.full((2,), 1.0), ops.full((3,), 1.0)]
    opt.apply(grads, [binary, head, other])
    np.testing.assert_array_equal(_np(binary), -np.ones(4))  # m = g > 0 = τ, same sign: flip
    np.testing.assert_allclose(_np(head), 0.5)                # 1 − 0.5·1
    np.testing.assert_allclose(_np(other), 0.75)              # 1 − 0.25·1
    assert [int(_np(o.iterations)) for o in opt.optimizers] == [1, 1, 1]
    assert int(_np(opt.iterations)) == 1
    # its variables: own first, then each child's, in route order
    assert len(opt.variables) == len(opt._variables) + sum(len(o.variables) for o in opt.optimizers)
    opt.learning_rate = 0.125  # Keras' learning-rate callbacks act on the default optimizer
    assert float(_np(opt.default.learning_rate)) == 0.125


def test_routing_config_round_trips_with_its_children():
    opt = RoutingOptimizer([("binary_kernels", Bop(gamma=1e-3)),
                            (re.compile(r"dense_\d+/bias"), "sgd")], default="adam")
    config = opt.get_config()
    assert config["routes"][0]["predicate"] == "binary_kernels"
    assert config["routes"][1]["path"] == r"dense_\d+/bias"
    again = RoutingOptimizer.from_config(config)
    assert again.get_config() == config
    assert [type(o).__name__ for o in again.optimizers] == ["Bop", "SGD", "Adam"]
    assert again.routes[1][0].pattern == r"dense_\d+/bias"


def test_routing_bad_input_fails_clearly():
    with pytest.raises(ValueError, match="'binary' is not a named predicate"):
        RoutingOptimizer([("binary", "adam")])
    with pytest.raises(TypeError, match=r"`routes\[0\]` must be a \(rule, optimizer\) pair"):
        RoutingOptimizer(["adam"])
    with pytest.raises(ValueError, match="own optimizer instance"):
        shared = keras.optimizers.SGD()
        RoutingOptimizer([("all", shared)], default=shared)
    with pytest.raises(ValueError, match="does not take arguments"):
        RoutingOptimizer(clipnorm=1.0)
    with pytest.raises(ValueError, match="`default`: Unknown optimizer 'nope'"):
        RoutingOptimizer(default="nope")
    binary, head, other = _variables()
    overlapping = RoutingOptimizer([("all", "sgd"), ("binary_kernels", "bop")])
    with pytest.raises(ValueError, match="'kernel' matches several routes: 'all', 'binary_kernels'"):
        overlapping.build([binary, head])
    by_callable = RoutingOptimizer([(lambda v: "head" in v.path, "sgd")])
    by_callable.apply([ops.ones(2)], [head])
    np.testing.assert_allclose(_np(head), 0.99)
    with pytest.raises(ValueError, match="cannot be serialized"):
        by_callable.get_config()


def test_for_training_routes_bop_and_guards_every_optimizer():
    guarded = kquant.optimizers.for_training("bop", 3e-3, gamma=1e-3)
    assert isinstance(guarded, kquant.optimizers.SkipNonFinite)
    routing = guarded.inner_optimizer
    assert isinstance(routing, RoutingOptimizer) and routing.routes[0][0] == "binary_kernels"
    assert float(_np(routing.default.learning_rate)) == pytest.approx(3e-3)
    sgd = kquant.optimizers.for_training("sgd", 0.5, momentum=0.9).inner_optimizer
    assert isinstance(sgd, keras.optimizers.SGD) and sgd.momentum == 0.9
    assert float(_np(sgd.learning_rate)) == 0.5
    with pytest.raises(ValueError, match="optimizer 'bop' with options {'gama': 1}"):
        kquant.optimizers.for_training("bop", gama=1)


def test_cli_lists_optimizers_and_refuses_bad_ones():
    out = CliRunner().invoke(main, ["optimizers"])
    assert out.exit_code == 0, out.output
    for name in ("alq", "bop", "routing", "skip_non_finite"):
        assert name in out.output
    out = CliRunner().invoke(main, ["fit", "--optimizer", "nope", "--epochs", "1", "--quiet"])
    assert out.exit_code != 0 and "Unknown optimizer 'nope'" in out.output
    out = CliRunner().invoke(main, ["fit", "--optimizer", "bop", "--optimizer-option", "gamma"])
    assert out.exit_code != 0 and "--optimizer-option" in out.output and "KEY=VALUE" in out.output


@pytest.mark.tf_only
def test_cli_fit_with_bop_trains_binary_kernels(tmp_path):
    path = str(tmp_path / "bop.keras")
    out = CliRunner().invoke(main, ["fit", "--optimizer", "bop", "--optimizer-option", "gamma=1e-3",
                                    "--optimizer-option", "threshold=1e-6", "--quantizer", "sign",
                                    "--epochs", "1", "--quiet", "--save", path])
    assert out.exit_code == 0, out.output
    assert "test accuracy:" in out.output
    model = keras.saving.load_model(path)
    routing = model.optimizer.inner_optimizer
    bop = routing.optimizers[0]
    assert isinstance(bop, Bop) and bop.threshold == 1e-6
    assert float(_np(bop.gamma)) == pytest.approx(1e-3)
    kernels = [layer.latent_kernel for layer in model.layers if hasattr(layer, "latent_kernel")]
    assert kernels and len(bop._trainable_variables) == len(kernels)
    for kernel in kernels:  # Bop trained every binary kernel: no latent weights are left
        assert set(np.unique(_np(kernel)).tolist()) == {-1.0, 1.0}
