"""ALQ math against NumPy references: sketching (Alg. 1), bases step, Eq. 23 refit."""

import itertools

import numpy as np
import pytest
from keras import ops

from kquant import xla
from kquant.alq import groups, sketching, steps


def _rng(seed=0):
    return np.random.default_rng(seed)


# -- sketching ---------------------------------------------------------------------
def test_sketch_residual_orthogonal_and_bases_independent():
    w = _rng().normal(size=(20, 16))
    bases, alpha, mask = sketching.sketch(w, max_bits=5, sigma=0.0)
    for g in range(w.shape[0]):
        active = mask[g] > 0
        b = bases[g][:, active].astype(np.float64)
        residual = w[g] - b @ alpha[g, active]
        np.testing.assert_allclose(b.T @ residual, 0.0, atol=1e-4)
        assert np.linalg.matrix_rank(b) == active.sum()
        assert set(np.unique(b)) <= {-1.0, 1.0}
        assert (alpha[g, active] > 0).all() and (alpha[g, ~active] == 0).all()


def test_sketch_error_non_increasing_with_bits_and_capped():
    w = _rng(1).normal(size=(30, 32))
    errors = []
    for bits in range(1, 9):
        b, a, m = sketching.sketch(w, max_bits=bits, sigma=0.0)
        assert (m.sum(axis=1) <= bits).all()
        errors.append(np.sum((w - sketching.reconstruct(b, a, m)) ** 2, axis=1))
    errors = np.array(errors)
    assert (np.diff(errors, axis=0) <= 1e-6 * np.sum(w**2, axis=1)).all()
    assert errors[-1].sum() < 0.2 * errors[0].sum()


def test_sketch_stops_at_sigma():
    w = _rng(2).normal(size=(40, 16))
    sigma = 0.05
    b, a, m = sketching.sketch(w, max_bits=8, sigma=sigma)
    relative = np.sum((w - sketching.reconstruct(b, a, m)) ** 2, axis=1) / np.sum(w**2, axis=1)
    bits = m.sum(axis=1)
    assert (relative <= sigma + 1e-6).all()  # stopped once under sigma ...
    for g in np.flatnonzero(bits > 1):  # ... and not earlier: one basis fewer is above sigma
        bb, aa, mm = sketching.sketch(w[g:g + 1], max_bits=int(bits[g]) - 1, sigma=0.0)
        err = np.sum((w[g] - sketching.reconstruct(bb, aa, mm)[0]) ** 2) / np.sum(w[g] ** 2)
        assert err > sigma
    assert bits.max() < 8


def test_sketch_small_group_and_zero_group():
    w = np.zeros((2, 3))
    w[1] = [1.0, -2.0, 0.5]
    b, a, m = sketching.sketch(w, max_bits=8, sigma=0.0)
    assert m[0].sum() == 0 and m[1].sum() <= 3
    np.testing.assert_allclose(sketching.reconstruct(b, a, m), w, atol=1e-5)


@pytest.mark.parametrize("bad", [0, 9, 2.5, True])
def test_invalid_max_bits(bad):
    with pytest.raises(ValueError, match="max_bits"):
        sketching.sketch(np.ones((2, 4)), max_bits=bad)


def test_group_layouts_roundtrip_and_errors():
    kernel = _rng(3).normal(size=(3, 3, 4, 5))
    for spec, n in (("pixel", 4), ("kernel", 9), ("channel", 36), ("subchannel(12)", 12), (6, 6)):
        layout = groups.GroupLayout(kernel.shape, spec)
        assert layout.group_size == n and layout.num_groups * n == kernel.size
        grouped = layout.to_groups_numpy(kernel)
        np.testing.assert_array_equal(layout.from_groups_numpy(grouped), kernel)
        np.testing.assert_allclose(ops.convert_to_numpy(layout.to_groups(kernel)), grouped)
    pixel = groups.GroupLayout(kernel.shape, "pixel").to_groups_numpy(kernel)
    np.testing.assert_array_equal(pixel[0], kernel[0, 0, :, 0])  # W[c,:,h,w] ↔ kernel[h,w,:,c]
    k_wise = groups.GroupLayout(kernel.shape, "kernel").to_groups_numpy(kernel)
    np.testing.assert_array_equal(k_wise[1], kernel[:, :, 1, 0].reshape(-1))
    with pytest.raises(ValueError, match="does not divide"):
        groups.GroupLayout((10, 4), "subchannel(3)")
    with pytest.raises(ValueError, match="Unknown `group`"):
        groups.GroupLayout((10, 4), "rowwise")


# -- bases step --------------------------------------------------------------------
def _brute_force_bases(target, alpha, mask):
    """All 2^I combinations per row, active slots only (NumPy reference)."""
    out = np.zeros(target.shape + (alpha.shape[1],))
    for g in range(target.shape[0]):
        active = np.flatnonzero(mask[g] > 0)
        combos = np.array(list(itertools.product([-1.0, 1.0], repeat=len(active))))
        levels = combos @ alpha[g, active] if len(active) else np.zeros(1)
        for j in range(target.shape[1]):
            best = combos[np.argmin(np.abs(target[g, j] - levels))] if len(active) else []
            out[g, j, active] = best
    return out


def test_bases_step_equals_brute_force_with_mixed_bitwidths():
    rng = _rng(4)
    g, n, bits = 7, 11, 4
    alpha = rng.uniform(0.1, 1.0, size=(g, bits))
    mask = np.zeros((g, bits))
    for i, width in enumerate([0, 1, 2, 3, 4, 2, 4]):
        mask[i, :width] = 1
    alpha = alpha * mask
    old = np.where(rng.random((g, n, bits)) < 0.5, -1.0, 1.0)
    target = rng.normal(size=(g, n))
    new = ops.convert_to_numpy(steps.nearest_bases(
        *(ops.convert_to_tensor(a.astype("float32")) for a in (target, old, alpha, mask))))
    reference = _brute_force_bases(target, alpha, mask)
    active = np.broadcast_to(mask[:, None, :] > 0, new.shape)
    np.testing.assert_array_equal(new[active], reference[active])
    np.testing.assert_array_equal(new[~active], old[~active])  # masked slots keep old signs


# -- coordinate refit (Eq. 23) -------------------------------------------------------
def test_refit_equals_numpy_solve_of_normal_equations():
    rng = _rng(5)
    g, n, bits, ridge = 5, 9, 3, 1e-6
    bases = np.where(rng.random((g, n, bits)) < 0.5, -1.0, 1.0)
    mask = np.ones((g, bits))
    mask[1, 2] = 0
    mask[3] = 0
    grad, h = rng.normal(size=(g, n)), rng.uniform(0.5, 2.0, size=(g, n))
    w_old = rng.normal(size=(g, n))
    got = ops.convert_to_numpy(steps.refit_coordinates(
        *(ops.convert_to_tensor(a.astype("float32")) for a in (bases, mask, grad, h, w_old)),
        ridge=ridge))
    for i in range(g):
        active = mask[i] > 0
        b = bases[i][:, active]
        expected = np.zeros(bits)
        if active.any():  # paper Eq. 23: α = −(BᵀHB + λI)⁻¹ Bᵀ(g − H ŵ_old)
            lhs = b.T @ np.diag(h[i]) @ b + ridge * np.eye(active.sum())
            expected[active] = -np.linalg.solve(lhs, b.T @ (grad[i] - h[i] * w_old[i]))
        np.testing.assert_allclose(got[i], expected, rtol=1e-4, atol=1e-5)


def test_quadratic_model_never_increases_on_convex_toy_problem():
    rng = _rng(6)
    g, n, bits = 16, 24, 3
    w = rng.normal(size=(g, n))
    bases, alpha, mask = sketching.sketch(w, bits, 0.0)
    t = lambda a: ops.convert_to_tensor(np.asarray(a, "float32"))  # noqa: E731
    for _ in range(5):
        grad, h = rng.normal(size=(g, n)) * 0.3, rng.uniform(0.2, 3.0, size=(g, n))
        w_old = sketching.reconstruct(bases, alpha, mask)
        nb, na = steps.bases_step(t(bases), t(alpha), t(mask), t(grad), t(h), ridge=1e-6)
        nb, na = ops.convert_to_numpy(nb), ops.convert_to_numpy(na)
        w_new = sketching.reconstruct(nb, na, mask)
        f = ops.convert_to_numpy(steps.quadratic_model(t(w_new), t(w_old), t(grad), t(h)))
        assert (f <= 1e-4).all(), f.max()  # f(ŵ_old) = 0
        assert (f < -1e-3).mean() > 0.5  # and it actually improves most groups
        assert (na >= 0).all() and set(np.unique(nb)) <= {-1.0, 1.0}
        bases, alpha = nb, na


# -- fast bases search (issue #10) ----------------------------------------------------
@pytest.mark.parametrize("bits", range(1, 9))
def test_sorted_search_returns_the_exhaustive_codes_ties_included(bits):
    rng = _rng(10 + bits)
    g, n = 12, 48
    alpha = rng.uniform(0.05, 1.0, size=(g, bits)).astype("float32")
    alpha[0] = 0.5                                    # all equal: many duplicate levels
    alpha[1] = np.round(alpha[1] * 4) / 4             # some equal
    mask = (rng.random((g, bits)) < 0.8).astype("float32")
    mask[2] = 0.0                                     # a removed group: every level is 0
    t = lambda a: ops.convert_to_tensor(np.asarray(a, "float32"))  # noqa: E731
    values = ops.convert_to_numpy(steps.levels(t(alpha), t(mask)))
    target = rng.normal(size=(g, n)).astype("float32") * 1.5
    third = n // 3
    for i in range(g):  # exact levels and exact midpoints between neighbours: ties
        target[i, :third] = values[i, rng.integers(0, 2**bits, third)]
        s = np.unique(values[i])
        if s.size > 1:
            j = rng.integers(0, s.size - 1, third)
            target[i, third:2 * third] = (s[j] + s[j + 1]) / 2
    exhaustive = ops.convert_to_numpy(steps.exhaustive_codes(t(target), t(alpha), t(mask)))
    fast = ops.convert_to_numpy(steps.sorted_codes(t(target), t(alpha), t(mask)))
    np.testing.assert_array_equal(fast, exhaustive)
    # ... and the exhaustive codes are the nearest levels (lowest pattern index on ties).
    distance = np.abs(target[..., None] - values[:, None, :])
    np.testing.assert_array_equal(exhaustive, np.argmin(distance, axis=-1))
    old = np.where(rng.random((g, n, bits)) < 0.5, -1.0, 1.0)
    by_search = [ops.convert_to_numpy(steps.nearest_bases(t(target), t(old), t(alpha), t(mask),
                                                          search=s))
                 for s in ("sorted", "exhaustive", "auto")]
    np.testing.assert_array_equal(by_search[0], by_search[1])
    np.testing.assert_array_equal(by_search[2], by_search[1])


@pytest.mark.tf_only
def test_auto_search_on_tensorflow_follows_the_measured_rule():
    import keras

    if keras.backend.backend() != "tensorflow":
        pytest.skip("TensorFlow seam")
    import tensorflow as tf

    small = steps.EXHAUSTIVE_MAX_BITS
    assert [steps.resolve_search("auto", b) for b in (small, small + 1)] == \
        ["exhaustive", "sorted"]
    assert steps.resolve_search("sorted", 2) == "sorted"
    # Inside an XLA-compiled step: always the (fused) exhaustive search.
    picked = tf.function(lambda: tf.constant(steps.resolve_search("auto", 8) == "exhaustive"),
                         jit_compile=True)
    assert bool(picked())
    # compile_with_xla: XLA from a plain graph (the search it runs is then the exhaustive
    # one), not inside a strategy's replica function; the same codes either way.
    rng = _rng(3)
    alpha = tf.constant(rng.uniform(0.05, 1.0, (6, 6)).astype("float32"))
    mask = tf.ones_like(alpha)
    target = tf.constant(rng.normal(size=(6, 20)).astype("float32"))

    def search(t, a, m):
        return steps.nearest_codes(t, a, m), tf.constant(xla.in_xla())

    step = xla.compile_with_xla(search)
    codes, compiled = tf.function(lambda: step(target, alpha, mask))()
    assert bool(compiled)
    with tf.distribute.MirroredStrategy(["/cpu:0"]).scope():
        replica = tf.distribute.get_strategy().run(tf.function(lambda: step(target, alpha, mask)))
    assert not bool(replica[1])
    for found in (codes, replica[0]):
        np.testing.assert_array_equal(found.numpy(),
                                      steps.sorted_codes(target, alpha, mask).numpy())


def test_exhaustive_search_under_xla_stores_no_distance_tensor():
    """The running-minimum search keeps no ``G·n·2^I`` distance tensor: XLA's scratch
    memory for it is far below that."""
    import keras

    if keras.backend.backend() != "jax":
        pytest.skip("reads JAX's compiled memory analysis")
    import jax
    import jax.numpy as jnp

    g, n, bits = 500, 200, 8
    alpha, target = jnp.ones((g, bits)), jnp.ones((g, n))
    compiled = jax.jit(steps.exhaustive_codes).lower(target, alpha, alpha).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < g * n * 2**bits * 4 / 16


def test_bases_search_name_is_checked():
    with pytest.raises(ValueError, match="search"):
        steps.nearest_bases(ops.zeros((1, 2)), ops.ones((1, 2, 1)), ops.ones((1, 1)),
                            ops.ones((1, 1)), search="binary")


@pytest.mark.core
@pytest.mark.parametrize("bits", [1, 3, 6])
def test_refit_from_codes_decode_and_project_match_numpy_also_under_xla(bits):
    """The bases step's code-histogram refit equals Eq. 23 on the decoded bases, and the
    XLA forms of ``decode``/``project`` (multiply-reduce) equal the matmul forms."""
    import keras

    rng = _rng(40 + bits)
    g, n, ridge = 7, 33, 1e-6
    codes = rng.integers(0, 2**bits, size=(g, n)).astype("int32")
    mask = (rng.random((g, bits)) < 0.7).astype("float32")
    mask[0] = 0.0
    mask[1] = 1.0
    alpha = rng.uniform(0.1, 1.0, size=(g, bits)).astype("float32")
    grad = rng.normal(size=(g, n)).astype("float32")
    h = rng.uniform(0.5, 2.0, size=(g, n)).astype("float32")
    w_old = rng.normal(size=(g, n)).astype("float32")
    bases = steps.sign_patterns(bits)[codes]                           # [G, n, I]
    t = ops.convert_to_tensor

    def run(fn, *args):
        if keras.backend.backend() == "tensorflow":  # also the XLA forms, compiled
            import tensorflow as tf

            compiled = tf.function(fn, jit_compile=True)(*(t(a) for a in args))
            return ops.convert_to_numpy(fn(*(t(a) for a in args))), ops.convert_to_numpy(compiled)
        out = ops.convert_to_numpy(fn(*(t(a) for a in args)))
        return out, out

    for got in run(lambda *a: steps.refit_from_codes(*a, ridge=ridge), codes, mask, grad, h, w_old):
        want = ops.convert_to_numpy(steps.refit_coordinates(
            t(bases), t(mask), t(grad), t(h), t(w_old), ridge=ridge))
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-5)
        assert (got[mask == 0] == 0).all()
    for got in run(steps.decode, bases, alpha, mask):
        np.testing.assert_allclose(got, np.einsum("gni,gi->gn", bases, alpha * mask), rtol=1e-6,
                                   atol=1e-6)
    for got in run(steps.project, grad, bases):
        np.testing.assert_allclose(got, np.einsum("gn,gni->gi", grad, bases), rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.core
@pytest.mark.parametrize("bits", [5, 8])
def test_bases_step_in_storage_dtype_equals_the_unfused_steps(bits):
    """Alg. 3 as one step (codes searched once, the sign fix applied to the codes, the
    bases written in their storage dtype) equals search → bases → Eq. 23 → flip on float
    bases, eagerly and under XLA (each form run the same way); some α flip here."""
    import keras

    from kquant.alq.layers import bases_dtype

    rng = _rng(70 + bits)
    g, n = 30, 8   # groups this small give collinear bases, and negative refits
    mask = (rng.random((g, bits)) < 0.8).astype("float32")
    mask[0] = 1.0
    alpha = (rng.uniform(0.05, 1.0, size=(g, bits)) * mask).astype("float32")
    bases = np.where(rng.random((g, n, bits)) < 0.5, -1.0, 1.0).astype("float32")
    grad = rng.normal(scale=2.0, size=(g, n)).astype("float32")
    h = rng.uniform(0.5, 2.0, size=(g, n)).astype("float32")
    moment = rng.normal(size=(g, bits)).astype("float32")
    t = ops.convert_to_tensor

    def unfused(b, a, m, gr, hh, mo):
        w_old = steps.decode(b, a, m)
        codes = steps.exhaustive_codes(w_old - gr / hh, a, m)
        refit = steps.refit_from_codes(codes, m, gr, hh, w_old)
        return steps.make_positive(steps.with_codes(codes, b, m), refit, mo) + (refit,)

    def fused(b, a, m, gr, hh, mo):
        return steps.bases_step(ops.cast(b, bases_dtype()), a, m, gr, hh, moments=(mo,),
                                search="exhaustive")

    runs = [lambda f: f]
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        runs.append(lambda f: tf.function(f, jit_compile=True))
    args = [t(a) for a in (bases, alpha, mask, grad, h, moment)]
    for run in runs:
        want = [ops.convert_to_numpy(x) for x in run(unfused)(*args)]
        assert (want[3] < 0).any(), "the case must flip some α"
        got = run(fused)(*args)
        assert keras.backend.standardize_dtype(got[0].dtype) == bases_dtype()
        np.testing.assert_array_equal(ops.convert_to_numpy(ops.cast(got[0], "float32")), want[0])
        np.testing.assert_allclose(ops.convert_to_numpy(got[1]), want[1], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(ops.convert_to_numpy(got[2]), want[2], rtol=1e-6)


@pytest.mark.core
def test_materialize_returns_its_tensors_and_compiles_to_a_conditional_under_xla():
    import keras

    from kquant import xla

    x = ops.convert_to_tensor(np.arange(6, dtype="float32").reshape(2, 3))
    codes = ops.convert_to_tensor(np.array([[1, 2, 3]], "int32"))
    out = xla.materialize((x, codes), x[0, 0])
    np.testing.assert_array_equal(ops.convert_to_numpy(out[0]), ops.convert_to_numpy(x))
    np.testing.assert_array_equal(ops.convert_to_numpy(out[1]), [[1, 2, 3]])
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        fn = tf.function(lambda a, c: xla.materialize((a * 2, c + 1), a[1, 1]), jit_compile=True)
        got = fn(x, codes)
        np.testing.assert_array_equal(ops.convert_to_numpy(got[0]), 2 * ops.convert_to_numpy(x))
        np.testing.assert_array_equal(ops.convert_to_numpy(got[1]), [[2, 3, 4]])
        hlo = fn.experimental_get_compiler_ir(x, codes)(stage="hlo")
        assert "conditional(" in hlo
