"""Fused quantizers (``Quantizer.fused``) where users run them — eager, in a TensorFlow
graph without XLA (their halves then XLA-compiled on their own,
``kquant.xla.compiled_in_graph``) and compiled — and the whole-tensor reductions
they use (``kquant.reductions``, folded under TensorFlow's XLA): values and
gradients equal the formulas in every mode."""

import keras
import numpy as np
import pytest
from keras import ops

import kquant
from kquant.testing import take_step, xla_launches
from kquant import reductions

pytestmark = pytest.mark.core

SHAPES = [(37,), (64, 48), (3, 3, 16, 32)]   # 37: not foldable, plain reduction


MODES = ["eager", "graph", "compiled"]


def _run(fn, mode):
    """``fn`` as users' steps run it: eager; in a TF graph without XLA (Keras' default
    on a CPU-only TensorFlow); compiled (``jit_compile`` on TF, ``jax.jit``; torch: eager)."""
    if mode == "eager":
        return fn
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=mode == "compiled")
    if mode == "graph":
        pytest.skip("a graph without XLA is TensorFlow's")
    if backend == "jax":
        import jax

        return jax.jit(fn)
    return fn


def _compiled(fn):
    return _run(fn, "compiled")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES)
def test_total_sum_and_max_equal_numpy(shape, mode):
    x = np.random.default_rng(len(shape)).normal(size=shape).astype("float32")
    x.flat[7] = x.flat[-3] = np.abs(x).max() + 1.0        # a tied maximum
    total, big = (ops.convert_to_numpy(v) for v in _run(
        lambda v: (reductions.total_sum(v), reductions.total_max(ops.abs(v))), mode)(
            ops.convert_to_tensor(x)))
    assert big == np.abs(x).max()
    np.testing.assert_allclose(total, x.astype("float64").sum(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES)
def test_total_sums_equal_numpy(shape, mode):
    """``total_sums(a, b, c)``: each sum (one variadic reduce where TF's XLA folds)."""
    rng = np.random.default_rng(len(shape) + 3)
    xs = [rng.normal(size=shape).astype("float32") for _ in range(3)]
    xs[2] = (np.abs(xs[2]) > 0.5).astype("float32")                 # a 0/1 mask: a count
    got = _run(lambda a, b, c: reductions.total_sums(a, b, c), mode)(
        *(ops.convert_to_tensor(x) for x in xs))
    assert len(got) == 3
    for g, x in zip(got, xs):
        np.testing.assert_allclose(ops.convert_to_numpy(g), x.astype("float64").sum(),
                                   rtol=1e-5, atol=1e-5)
    assert float(ops.convert_to_numpy(got[2])) == xs[2].sum()        # counts exact


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ties", [1, 2, 5])
def test_max_abs_and_count_of_max_are_exact(ties, mode):
    """``max_abs`` is ``max|x|`` and ``count_of_max`` the number of ``|x|`` equal to it,
    both exactly: ties of either sign, a value one float below the maximum (not a tie),
    and an all-zero tensor (count 1 by definition)."""
    rng = np.random.default_rng(ties)
    x = rng.normal(size=(64, 48)).astype("float32")
    top = np.float32(np.abs(x).max() + 0.25)
    x.flat[rng.choice(x.size, ties, replace=False)] = top * np.array([1, -1] * 3)[:ties]
    x.flat[np.argmin(np.abs(x))] = np.nextafter(top, np.float32(0))   # just below: no tie
    fn = _run(lambda v: (reductions.max_abs(v), reductions.count_of_max(v, reductions.max_abs(v))),
              mode)
    big, count = (float(ops.convert_to_numpy(r)) for r in fn(ops.convert_to_tensor(x)))
    assert big == top and count == ties
    zero, one = (float(ops.convert_to_numpy(r)) for r in fn(ops.zeros((64, 48))))
    assert zero == 0.0 and one == 1.0


@pytest.mark.tf_only
def test_total_sums_are_one_reduce_under_tensorflow_xla():
    """Under TF's XLA the folded tensors of ``total_sums`` are read by one (variadic) reduce."""
    import tensorflow as tf

    x = tf.ones((64, 48))
    hlo = tf.function(lambda a, b: reductions.total_sums(a, b), jit_compile=True
                      ).experimental_get_compiler_ir(x, x)(stage="hlo")
    big = [line for line in hlo.splitlines() if " reduce(" in line and "[8,384]" in line]
    assert len(big) == 1 and ") reduce(" in big[0], big
    half = tf.cast(x, "bfloat16")   # 16-bit: separate sums, which TF accumulates in float32
    hlo = tf.function(lambda a, b: reductions.total_sums(a, b), jit_compile=True
                      ).experimental_get_compiler_ir(half, half)(stage="hlo")
    assert ") reduce(" not in hlo


def test_fold_only_where_tensorflow_xla_compiles():
    seen = []

    def probe(v):
        seen.append(reductions._fold_here())
        return reductions.total_sum(v)

    x = ops.ones((16, 16))
    probe(x)
    _compiled(probe)(x)
    assert seen == [False, keras.backend.backend() == "tensorflow"]


def test_compiled_in_graph_only_in_a_tensorflow_graph_without_xla():
    from kquant.xla import compiled_in_graph

    seen = {}

    def probe(v, mode):
        seen[mode] = compiled_in_graph(ops.negative, training=True) is not ops.negative
        assert compiled_in_graph(ops.negative) is ops.negative   # inference: plain ops
        return v

    for mode in MODES:
        try:
            _run(lambda v, mode=mode: probe(v, mode), mode)(ops.ones(()))
        except pytest.skip.Exception:
            pass
    tf_graph = keras.backend.backend() == "tensorflow"
    assert seen == {"eager": False, "compiled": False, **({"graph": True} if tf_graph else {})}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ties", [False, True])
def test_dorefa_fused_gradient_equals_formula(ties, mode):
    """DoReFa 2-bit (STE) on a foldable kernel, eager, in a graph, compiled: ``∂ℓ/∂W = (1 − t²)(g_w/2M +
    sign(t)·1{|t| = M}/#{|t| = M}·∂ℓ/∂M)``, ``∂ℓ/∂M = −2Σ g_w·t/(2M)²``, ``g_w = 2g``."""
    rng = np.random.default_rng(int(ties))
    w = rng.uniform(-0.7, 0.7, (64, 48)).astype("float32")
    w[3, 5] = 0.9
    if ties:
        w[10, 11], w[60, 23] = -0.9, 0.9
    up = rng.normal(size=w.shape).astype("float32")
    q = kquant.quantizers.DoReFa(bits=2, estimator="ste")
    q.build(w.shape)
    got = ops.convert_to_numpy(_run(_grad_fn(q, up), mode)(ops.convert_to_tensor(w)))

    t = np.tanh(w.astype("float64"))
    m = np.abs(t).max()
    g_w = 2 * up
    tie = np.abs(t) == m
    g_m = -2 * np.sum(g_w * t) / (2 * m) ** 2
    expected = (1 - t * t) * (g_w / (2 * m) + np.sign(t) * tie / tie.sum() * g_m)
    assert tie.sum() == (3 if ties else 1)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_uniform_step_gradient_equals_formula(mode):
    """Uniform 2-bit, learned step Δ (LSQ scale off), clipped STE (LSQ's step gradient):
    ``∂ℓ/∂Δ = Σ g·(q − z·1{lo ≤ z ≤ hi})``, reaching ``c`` (``Δ = Δ₀·|c|``, ``c = 1``) as ``Δ₀·∂ℓ/∂Δ``."""
    rng = np.random.default_rng(5)
    w = rng.normal(0, 0.05, (64, 48)).astype("float32")
    up = rng.normal(size=w.shape).astype("float32")
    q = kquant.quantizers.Uniform(bits=2, estimator="clipped_ste", lsq_grad_scale=False)
    q.build(w.shape)
    take_step(q, lambda: ops.sum(q(ops.convert_to_tensor(w), training=True)))  # Δ₀ from the data
    step = float(ops.convert_to_numpy(q.step_init))

    def loss_grads(v):
        if keras.backend.backend() == "jax":
            import jax

            return jax.grad(lambda s: ops.sum(ops.multiply(
                q.stateless_call([s, ops.convert_to_tensor(q.step_init),
                                  ops.convert_to_tensor(q.initialized)], [], v,
                                 training=True)[0], ops.convert_to_tensor(up))))(
                ops.convert_to_tensor(q.step_scale))
        return _grad_fn(q, up, wrt=q.step_scale)(v)

    got = float(ops.convert_to_numpy(_run(loss_grads, mode)(ops.convert_to_tensor(w))))
    z = w.astype("float64") / step
    levels = np.floor(np.clip(z, -2, 1) + 0.5)
    inside = (z >= -2) & (z <= 1)
    expected = step * np.sum(up * (levels - z * inside))
    assert 0 < inside.sum() < inside.size
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def _grad_fn(q, up, wrt=None):
    """``v ↦ ∂Σ(q(v)·up)/∂(v or wrt)`` on TensorFlow, JAX or torch."""
    backend = keras.backend.backend()
    upstream = ops.convert_to_tensor(up)
    if backend == "tensorflow":
        import tensorflow as tf

        def fn(v):
            with tf.GradientTape() as tape:
                tape.watch(v)
                loss = tf.reduce_sum(q(v, training=True) * upstream)
            return tape.gradient(loss, v if wrt is None else wrt.value)
        return fn
    if backend == "jax":
        import jax

        return jax.grad(lambda v: ops.sum(q(v, training=True) * upstream))
    import torch

    def fn(v):
        v = v.clone().requires_grad_(True)
        target = v if wrt is None else wrt.value
        loss = ops.sum(q(v, training=True) * upstream)
        (g,) = torch.autograd.grad(loss, [target])
        return g
    return fn


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["sign", "bwn"])
def test_sign_and_bwn_fused_gradient_equals_formula(name, mode):
    """Sign / BWN with the clipped STE: ``Q = a·sign(W)`` (``a = 1``; BWN ``mean|W|``, a
    constant), ``∂ℓ/∂W = a·1{|W| ≤ 1}·g``; sign(0) = +1."""
    rng = np.random.default_rng(7)
    w = rng.uniform(-1.6, 1.6, (32, 24)).astype("float32")
    w[0, :3] = [0.0, 1.0, -1.0]
    up = rng.normal(size=w.shape).astype("float32")
    q = kquant.quantizers.get(name)
    q.build(w.shape)
    a = np.abs(w.astype("float64")).mean() if name == "bwn" else 1.0
    got = ops.convert_to_numpy(_run(_grad_fn(q, up), mode)(ops.convert_to_tensor(w)))
    np.testing.assert_allclose(got, a * (np.abs(w) <= 1) * up, rtol=1e-5, atol=1e-6)
    value = ops.convert_to_numpy(_run(lambda v: q(v, training=True), mode)(ops.convert_to_tensor(w)))
    np.testing.assert_allclose(value, a * np.where(w >= 0, 1.0, -1.0), rtol=1e-6)


@pytest.mark.tf_only
def test_compiled_in_graph_not_under_tf_distribute():
    """A strategy's replicas would each compile the halves at every trace: plain ops there."""
    import tensorflow as tf

    from kquant.xla import compiled_in_graph

    seen = []

    @tf.function
    def probe(v):
        seen.append(compiled_in_graph(ops.negative, training=True) is ops.negative)
        return v

    with tf.distribute.MirroredStrategy(["/cpu:0"]).scope():
        probe(tf.ones(()))
    probe(tf.constant(2.0))
    assert seen == [True, False]


@pytest.mark.tf_only
@pytest.mark.parametrize("name, estimator, launches", [
    ("twn", "ste", 1), ("bitnet", "ste", 1), ("bwn", "ste", 1),   # ∂ℓ/∂W = g·a/d
    ("twn", "clipped_ste", 2), ("bwn", "clipped_ste", 2), ("dorefa", "ste", 2)])
def test_graph_without_xla_compiles_a_backward_that_reads_the_kernel(name, estimator, launches):
    """A TensorFlow graph without XLA compiles the fused forward, and the backward only
    where it reads the kernel: the STE's ``g·a/d`` of BWN, TWN and BitNet stays a plain
    product (TensorFlow folds it into the optimizer's ``lr·g``)."""
    import tensorflow as tf

    q = kquant.quantizer(name, estimator=estimator)
    w = np.random.default_rng(0).normal(size=(64, 48)).astype("float32")
    up = np.random.default_rng(1).normal(size=w.shape).astype("float32")
    fn = tf.function(_grad_fn(q, up))
    assert xla_launches(fn.get_concrete_function(tf.constant(w)).graph) == launches


def _stats(name, w, axes):
    """NumPy ``(a, d)`` of ``Q = a·step(W/d)`` for BWN (``d = 1``), TWN and BitNet."""
    w = w.astype("float64")
    mean = np.abs(w).mean(axis=axes, keepdims=True)
    if name == "bwn":
        return mean, 1.0
    if name == "bitnet":
        return mean, mean + 1e-5
    d = 2 * 0.7 * mean
    kept = np.abs(np.floor(np.clip(w / d, -1, 1) + 0.5)) > 0
    return (np.abs(w) * kept).sum(axis=axes, keepdims=True) / kept.sum(axis=axes, keepdims=True), d


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("name", ["bwn", "twn", "bitnet"])
def test_scaled_quantizers_fused_equal_formula(name, per_channel, mode):
    """BWN, TWN, BitNet (STE) in training: ``Q = a·step(W/d)`` with the statistics of the
    tensor (per channel: of each output channel), ``∂ℓ/∂W = a·g/d`` (BWN's clipped STE:
    ``a·1{|W| ≤ 1}·g``)."""
    rng = np.random.default_rng(11)
    w = (rng.normal(size=(3, 3, 8, 16)) * rng.uniform(0.2, 2.0, 16)).astype("float32")
    up = rng.normal(size=w.shape).astype("float32")
    q = kquant.quantizers.get({"name": name, "config": {"per_channel": per_channel}})
    q.build(w.shape)
    a, d = _stats(name, w, (0, 1, 2) if per_channel else None)
    staircase = np.where(w >= 0, 1.0, -1.0) if name == "bwn" else np.floor(
        np.clip(w / d, -1, 1) + 0.5)
    slope = (np.abs(w) <= 1) if name == "bwn" else 1.0
    value = ops.convert_to_numpy(_run(lambda v: q(v, training=True), mode)(ops.convert_to_tensor(w)))
    np.testing.assert_allclose(value, a * staircase, rtol=1e-5, atol=1e-6)
    got = ops.convert_to_numpy(_run(_grad_fn(q, up), mode)(ops.convert_to_tensor(w)))
    np.testing.assert_allclose(got, a * slope * up / d, rtol=1e-5, atol=1e-6)


class GenericTWN(kquant.quantizers.TWN):
    def pre(self, x, training=None):   # overriding `pre` selects the generic (autodiff) path
        return super().pre(x, training)


class GenericBitNet(kquant.quantizers.BitNet):
    def pre(self, x, training=None):
        return super().pre(x, training)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("estimator", ["clipped_ste", "htge"])
@pytest.mark.parametrize("fused, generic", [(kquant.quantizers.TWN, GenericTWN),
                                            (kquant.quantizers.BitNet, GenericBitNet)])
def test_ternary_fused_equal_generic_path(fused, generic, estimator, mode):
    """With an estimator whose ``F'`` depends on the distance ``s`` to the nearest boundary
    (HTGE), the fused backward evaluates it at ``s`` of ``W/d``, as autodiff does."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(64, 48)).astype("float32")
    up = rng.normal(size=w.shape).astype("float32")
    out = []
    for cls in (fused, generic):
        q = cls(estimator=estimator)
        q.build(w.shape)
        out.append([ops.convert_to_numpy(_run(f, mode)(ops.convert_to_tensor(w)))
                    for f in (lambda v, q=q: q(v, training=True), _grad_fn(q, up))])
    np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out[0][1], out[1][1], rtol=1e-5, atol=1e-5)
    assert np.abs(out[0][1]).max() > 0


@pytest.mark.parametrize("mode", MODES)
def test_pact_fused_gradients_equal_formula(mode):
    """PACT 3-bit, α = 2, clipped STE: ``y = round(clip(x, 0, α)·7/α)·α/7``,
    ``∂ℓ/∂x = g·1{0 ≤ x ≤ α}``, ``∂ℓ/∂α = Σ g·1{x ≥ α}`` (Choi et al., Eqs. 2–3)."""
    rng = np.random.default_rng(9)
    x = (3 * rng.normal(size=(64, 48))).astype("float32")
    x[0, :3] = [0.0, 2.0, 2.0 + 1e-6]
    up = rng.normal(size=x.shape).astype("float32")
    q = kquant.quantizers.PACT(bits=3, alpha=2.0)
    q.build(x.shape)
    y = ops.convert_to_numpy(_run(lambda v: q(v, training=True), mode)(ops.convert_to_tensor(x)))
    np.testing.assert_allclose(y, np.floor(np.clip(x, 0, 2) * 7 / 2 + 0.5) * 2 / 7, rtol=1e-6)
    g_x = ops.convert_to_numpy(_run(_grad_fn(q, up), mode)(ops.convert_to_tensor(x)))
    np.testing.assert_allclose(g_x, up * ((x >= 0) & (x <= 2)), rtol=1e-6)
    if keras.backend.backend() == "jax":
        import jax

        def alpha_grad(v):
            return jax.grad(lambda a: ops.sum(q.stateless_call([a], [], v, training=True)[0]
                                              * ops.convert_to_tensor(up)))(
                ops.convert_to_tensor(q.alpha))
    else:
        alpha_grad = _grad_fn(q, up, wrt=q.alpha)
    got = float(ops.convert_to_numpy(_run(alpha_grad, mode)(ops.convert_to_tensor(x))))
    np.testing.assert_allclose(got, np.sum(up * (x >= 2)), rtol=1e-5)
