"""ManiQuant WCG: the explicit matrix formula, clipped STE at χ = 0, linear memory, training."""

import math

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from keras import ops
from kquant.testing import grad

import kquant
from kquant_maniquant import WCG, UnitClip, weak_curvature_gradient

pytestmark = pytest.mark.core  # backend-agnostic core: also run on torch


def _explicit(g_hat, w, chi):
    """(I + χ/tr(P)·P)·vec(g) ∘ 1{|W| ≤ 1} with the n×n matrix P = t tᵀ (NumPy, float64)."""
    t = np.tanh(w.astype("float64")).ravel()
    p = np.outer(t, t)
    d = np.eye(t.size) + chi / np.trace(p) * p
    return (d @ g_hat.astype("float64").ravel()).reshape(w.shape) * (np.abs(w) <= 1)


@pytest.mark.parametrize("shape", [(3, 3, 2, 4), (7, 5)])
@pytest.mark.parametrize("name,bits", [("sign", None), ("dorefa", 2), ("dorefa", 3)])
def test_equals_explicit_matrix_formula(shape, name, bits):
    rng = np.random.default_rng(0)
    w = rng.uniform(-1.3, 1.3, size=shape).astype("float32")   # some weights outside [−1, 1]
    c = rng.normal(size=shape).astype("float32")                # ℓ = Σ c·Ŵ, so g_Ŵ = c
    kwargs = {} if bits is None else {"bits": bits}
    q = kquant.quantizer(name, estimator="wcg", **kwargs)
    _, (g,) = grad(lambda t: ops.sum(ops.multiply(q(t), c)), w)
    chi = 1.0 / shape[-1]                                        # default: 1/out_channels
    np.testing.assert_allclose(g, _explicit(c, w, chi), rtol=1e-4, atol=1e-6)
    assert np.max(np.abs(_explicit(c, w, chi) - _explicit(c, w, 0.0))) > 1e-4  # χ matters


def test_configured_chi():
    rng = np.random.default_rng(1)
    w = rng.uniform(-1, 1, size=(6, 4)).astype("float32")
    c = rng.normal(size=w.shape).astype("float32")
    q = kquant.quantizer("sign", estimator=WCG(chi=0.8))
    _, (g,) = grad(lambda t: ops.sum(ops.multiply(q(t), c)), w)
    np.testing.assert_allclose(g, _explicit(c, w, 0.8), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["sign", "bwn"])
def test_chi_zero_is_clipped_ste(name):
    rng = np.random.default_rng(2)
    w = rng.uniform(-1.5, 1.5, size=(5, 5, 3, 8)).astype("float32")
    c = rng.normal(size=w.shape).astype("float32")
    q_wcg = kquant.quantizer(name, estimator=WCG(chi=0.0))
    q_ste = kquant.quantizer(name, estimator="clipped_ste")
    _, (g_wcg,) = grad(lambda t: ops.sum(ops.multiply(q_wcg(t), c)), w)
    _, (g_ste,) = grad(lambda t: ops.sum(ops.multiply(q_ste(t), c)), w)
    np.testing.assert_array_equal(g_wcg, g_ste)


N_SIDE = 4096  # a 4096×4096 kernel: n = 16.8 M, n² = 2.8e14 floats (1.1 PB)


def _largest_intermediates(shape):
    """Element counts of every value in the traced gradient of Σ c·sign_wcg(W)."""
    q = kquant.quantizer("sign", estimator="wcg")
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        def g(w, c):
            return jax.grad(lambda w_: ops.sum(q(w_) * c))(w)

        spec = jax.ShapeDtypeStruct(shape, "float32")
        jaxpr = jax.make_jaxpr(g)(spec, spec)
        sizes = []

        def walk(jx):
            for eqn in jx.eqns:
                for v in eqn.outvars:
                    sizes.append(math.prod(getattr(v.aval, "shape", ())))
                for sub in jax.core.jaxprs_in_params(eqn.params):
                    walk(sub)

        walk(jaxpr.jaxpr)
        return sizes
    if backend == "torch":  # every tensor the forward and backward ops produce
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        class RecordSizes(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                sizes.extend(t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor))
                return out

        sizes = []
        w = torch.zeros(shape, requires_grad=True)
        c = torch.ones(shape)
        with RecordSizes():
            torch.sum(q(w) * c).backward()
        assert w.grad is not None and w.grad.shape == w.shape
        return sizes
    import tensorflow as tf

    @tf.function
    def g(w, c):
        with tf.GradientTape() as tape:
            tape.watch(w)
            loss = tf.reduce_sum(q(w) * c)
        return tape.gradient(loss, w)

    spec = tf.TensorSpec(shape, tf.float32)
    graph = g.get_concrete_function(spec, spec).graph
    sizes = []
    for op in graph.get_operations():
        for out in op.outputs:
            dims = out.shape.as_list() if out.shape.rank is not None else [None]
            assert None not in dims, (op.name, dims)
            sizes.append(math.prod(dims))
    return sizes


def test_memory_is_linear_for_a_4096_square_kernel():
    n = N_SIDE * N_SIDE
    sizes = _largest_intermediates((N_SIDE, N_SIDE))
    assert len(sizes) > 5
    assert max(sizes) <= n, max(sizes)            # nothing bigger than the kernel itself
    # and it runs: one real gradient of the 4096×4096 kernel, checked on a slice
    rng = np.random.default_rng(3)
    w = rng.uniform(-1.2, 1.2, size=(N_SIDE, N_SIDE)).astype("float32")
    c = rng.normal(size=w.shape).astype("float32")
    g = ops.convert_to_numpy(weak_curvature_gradient(ops.convert_to_tensor(c),
                                                     ops.convert_to_tensor(w), 1.0 / N_SIDE))
    t = np.tanh(w.astype("float64"))
    coef = (1.0 / N_SIDE) * np.sum(t * c) / np.sum(t * t)
    rows = slice(0, 8)
    expected = (c[rows] + coef * t[rows]) * (np.abs(w[rows]) <= 1)
    np.testing.assert_allclose(g[rows], expected, rtol=1e-3, atol=1e-5)


def _digits(n=256):
    x, y = kquant.datasets.load("digits")[0]
    return x[:n], y[:n]


def _model(estimator="wcg"):
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Flatten(),
        kquant.QuantDense(64, kernel_quantizer="sign", estimator=estimator,
                          kernel_constraint=UnitClip(), kernel_initializer="glorot_uniform"),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        kquant.QuantDense(10, kernel_quantizer="dorefa", estimator=estimator,
                          kernel_constraint=UnitClip()),
    ])


def test_training_lowers_the_loss_and_keeps_weights_in_unit_box():
    x, y = _digits()
    model = _model()
    model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    first = model.evaluate(x, y, verbose=0)
    model.fit(x, y, epochs=8, batch_size=32, verbose=0)
    assert model.evaluate(x, y, verbose=0) < 0.6 * first
    for layer in (model.layers[1], model.layers[-1]):
        assert np.max(np.abs(ops.convert_to_numpy(layer.kernel))) <= 1.0


def test_registered_serialized_and_saved(tmp_path):
    assert isinstance(kquant.estimators.get("wcg"), WCG)
    assert isinstance(kquant.estimators.get("maniquant", chi=0.5), WCG)
    info = {p.name: p for p in kquant.estimators.registry.info()}
    assert info["wcg"].package == info["maniquant"].package == "kquant-maniquant"
    data = kquant.estimators.serialize(WCG(chi=0.25))
    assert data["name"] in ("wcg", "maniquant") and data["config"] == {"chi": 0.25}
    assert kquant.estimators.get(data).chi == 0.25
    x, y = _digits(64)
    model = _model(estimator=WCG(chi=0.3))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=1, batch_size=32, verbose=0)
    model.save(tmp_path / "wcg.keras")
    loaded = keras.saving.load_model(tmp_path / "wcg.keras")
    np.testing.assert_array_equal(model.predict(x, verbose=0), loaded.predict(x, verbose=0))
    assert loaded.layers[1].kernel_quantizer.estimator.chi == 0.3
    from kquant.cli import main

    out = CliRunner().invoke(main, ["estimators"], terminal_width=200)
    assert out.exit_code == 0 and "wcg" in out.output and "kquant-maniquant" in out.output


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="chi"):
        WCG(chi=-1.0)
    with pytest.raises(ValueError, match="chi"):
        WCG(chi=float("nan"))
    with pytest.raises(ValueError, match="limit"):
        UnitClip(0.0)


def test_refused_on_an_input_quantizer_where_it_would_mix_the_batch():
    with pytest.raises(ValueError, match="input_quantizer.*whole-tensor"):
        kquant.QuantDense(3, input_quantizer=kquant.quantizer("sign", estimator="wcg"))
    kquant.QuantDense(3, kernel_quantizer=kquant.quantizer("sign", estimator="wcg"))  # kernels: fine
