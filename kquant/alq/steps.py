"""The projected updates of ALQ as pure functions of tensors (``keras.ops``).

Shapes: bases ``B`` ``[G, n, I]`` (±1), coordinates ``α`` ``[G, I]``, mask
``[G, I]`` (1 = active basis), weight-domain ``g``, ``H`` ``[G, n]`` (the
quadratic model ``gᵀΔ + ½ΔᵀHΔ`` of ALQ Eq. 10 with ``g = a·m̂``, ``H = diag``).
"""

from __future__ import annotations

import numpy as np
from keras import ops

from kquant.xla import in_xla, materialize


def sign_patterns(bits: int):
    """All ``2^bits`` rows ``b ∈ {±1}^bits`` (row k, column i: ``1 − 2·bit_i(k)``), float32."""
    k = np.arange(2**bits)[:, None]
    return (1.0 - 2.0 * ((k >> np.arange(bits)[None, :]) & 1)).astype("float32")


def decode(bases, coordinates, mask):
    """``ŵ_g = B_g (α_g ⊙ mask_g)`` → ``[G, n]``."""
    bases = ops.cast(bases, coordinates.dtype)
    if in_xla():  # one fused multiply-reduce; XLA's batched dot of [n, I]·[I] costs ~1.7×
        return ops.sum(bases * ops.expand_dims(coordinates * mask, 1), axis=-1)
    return ops.squeeze(ops.matmul(bases, ops.expand_dims(coordinates * mask, -1)), -1)


def project(g, bases):
    """``B_gᵀ g_g`` → ``[G, I]`` (a weight-domain vector per group onto its bases)."""
    bases = ops.cast(bases, g.dtype)
    if in_xla():  # as in :func:`decode`
        return ops.sum(bases * ops.expand_dims(g, -1), axis=1)
    return ops.squeeze(ops.matmul(ops.expand_dims(g, 1), bases), 1)


def levels(coordinates, mask):
    """The ``2^I`` representable values ``bᵀ(α ⊙ mask)`` of every group, ``[G, 2^I]``
    (column k is sign pattern k of :func:`sign_patterns`)."""
    patterns = ops.convert_to_tensor(sign_patterns(int(coordinates.shape[-1])))
    return ops.matmul(coordinates * mask, ops.transpose(patterns))


def exhaustive_codes(target, coordinates, mask):
    """Pattern index ``k`` of the nearest level per weight, by exhaustive search.

    Every one of the ``2^I`` levels is compared with every weight, as a running
    minimum over the levels (strict ``<``: ties go to the lowest index, as
    ``argmin``): memory ``O(G·n)``, and under XLA one fused element-wise loop
    (4.5× faster than an ``argmin`` over a ``[G, n, 2^I]`` distance tensor at
    I = 6, 8× at I = 8; TF CPU, 60k weights).
    """
    values = levels(coordinates, mask)                                    # [G, 2^I]
    best = ops.abs(target - values[:, :1])
    code = ops.zeros(ops.shape(target), dtype="int32")
    for k in range(1, int(values.shape[-1])):
        distance = ops.abs(target - values[:, k:k + 1])
        closer = distance < best
        best = ops.where(closer, distance, best)
        code = ops.where(closer, ops.full_like(code, k), code)
    return code


def sorted_codes(target, coordinates, mask):
    """Same codes as :func:`exhaustive_codes`, memory ``O(G·(n + 2^I))``.

    Each group's ``2^I`` levels are sorted once (stable, so equal levels keep
    pattern order); a branchless ``I``-step bisection finds, per weight, the
    first sorted level ``≥ t``; the nearest level is that one or its
    predecessor (taken at the start of its run of equal values), compared with
    the exhaustive search's own ``|t − level|`` and lowest-index tie rule.
    """
    bits = int(coordinates.shape[-1])
    size = 2**bits
    values = levels(coordinates, mask)                                    # [G, L]
    order = _stable_argsort(values)
    ordered = _take(values, order)                                         # [G, L] ascending
    # Start of each run of equal sorted values (its lowest pattern index).
    position = ops.broadcast_to(ops.arange(size, dtype="int32"), ops.shape(ordered))
    new_run = ops.concatenate([ops.ones_like(ordered[:, :1], dtype="bool"),
                               ordered[:, 1:] != ordered[:, :-1]], axis=-1)
    run_start = _cummax(ops.where(new_run, position, 0))
    # below = #levels < t, by bisection over the sorted row (I steps).
    below = ops.zeros(ops.shape(target), dtype="int32")
    for step in (2**e for e in range(bits - 1, -1, -1)):
        probe = _take(ordered, below + (step - 1))
        below = below + ops.where(probe < target, step, 0)
    below = below + ops.cast(ordered[:, -1:] < target, "int32")           # all levels < t
    hi = ops.minimum(below, size - 1)
    lo = _take(run_start, ops.maximum(below - 1, 0))
    d_hi = ops.abs(target - _take(ordered, hi))
    d_lo = ops.abs(target - _take(ordered, lo))
    code_hi = _take(order, hi)
    code_lo = _take(order, lo)
    pick_lo = ops.logical_or(d_lo < d_hi, ops.logical_and(d_lo == d_hi, code_lo < code_hi))
    return ops.where(pick_lo, code_lo, code_hi)


def _take(x, indices):
    """Backend seam: ``take_along_axis(x, indices, axis=-1)`` for ``[G, ·]`` tensors
    (on TensorFlow one batched ``tf.gather``; Keras' generic version adds a dozen ops)."""
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.gather(x, indices, batch_dims=1)
    return ops.take_along_axis(x, indices, axis=-1)


def _stable_argsort(values):
    """Backend seam: ``argsort`` along the last axis keeping equal values in index order
    (``tf.argsort`` is unstable by default; JAX's is stable)."""
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.cast(tf.argsort(values, axis=-1, stable=True), tf.int32)
    if keras.backend.backend() == "torch":
        import torch

        return torch.argsort(values, dim=-1, stable=True).to(torch.int32)
    return ops.cast(ops.argsort(values, axis=-1), "int32")


def _cummax(x):
    """Running maximum along the last axis (log-step scan; ``keras.ops`` has no cummax)."""
    size = int(x.shape[-1])
    shift = 1
    while shift < size:
        padded = ops.concatenate([ops.zeros_like(x[:, :shift]), x[:, :-shift]], axis=-1)
        x = ops.maximum(x, padded)
        shift *= 2
    return ops.cast(x, "int32")


def codes_to_bases(codes, bits, dtype="float32"):
    """Pattern indices ``[G, n]`` → ±1 bases ``[G, n, bits]`` (bit i set ↔ −1)."""
    shifts = ops.convert_to_tensor(np.arange(bits, dtype="int32"))
    bit = ops.bitwise_and(ops.right_shift(ops.expand_dims(ops.cast(codes, "int32"), -1), shifts), 1)
    return ops.cast(1 - 2 * bit, dtype)


def bases_to_codes(bases):
    """±1 bases ``[G, n, I]`` → pattern indices ``[G, n]`` (inverse of :func:`codes_to_bases`)."""
    bits = int(bases.shape[-1])
    weights = ops.convert_to_tensor((2 ** np.arange(bits)).astype("int32"))
    return ops.sum(ops.cast(ops.cast(bases, "float32") < 0, "int32") * weights, axis=-1)


SEARCHES = ("auto", "sorted", "exhaustive")

#: ``search="auto"``: the exhaustive search wherever XLA compiles the step (one
#: fused loop; the ALQ optimizer compiles its layer step with XLA on TensorFlow
#: even when the train step is not, :func:`compile_with_xla`); outside XLA
#: (torch, ``tf.distribute`` replicas, eager calls) the exhaustive search for
#: ``I ≤ EXHAUSTIVE_MAX_BITS`` and the sorted one above (``2^I`` un-fused passes would each re-read the weights).
EXHAUSTIVE_MAX_BITS = 2


def resolve_search(search, bits):
    """``"auto"`` → the search to run here (see :data:`EXHAUSTIVE_MAX_BITS`):
    ``"exhaustive"`` or ``"sorted"``; the other names are returned as given (checked)."""
    if search not in SEARCHES:
        raise ValueError(f"`search` must be one of {SEARCHES}, got {search!r}.")
    if search != "auto":
        return search
    return "exhaustive" if bits <= EXHAUSTIVE_MAX_BITS or in_xla() else "sorted"


def nearest_codes(target, coordinates, mask, search="auto"):
    """Pattern index of the nearest level per weight, by ``search`` (see :func:`nearest_bases`)."""
    how = resolve_search(search, int(coordinates.shape[-1]))
    return (sorted_codes if how == "sorted" else exhaustive_codes)(target, coordinates, mask)


def nearest_bases(target, bases, coordinates, mask, search="auto"):
    """Bases step (ALQ Eq. 19–20): each row ``B_{g,j}`` ← the ``b`` whose ``bᵀα_g`` is nearest ``t_{g,j}``.

    ``search="sorted"`` (bisection in each group's sorted levels),
    ``"exhaustive"`` (the paper's search over all ``2^I`` patterns, as a running
    minimum; fused into one loop under XLA) or ``"auto"``
    (:func:`resolve_search`: the faster one here); memory ``O(G·n)`` for both;
    all give the same codes. Masked slots have a zero coefficient, so they only
    repeat levels; they keep their old value.
    """
    return with_codes(nearest_codes(target, coordinates, mask, search), bases, mask)


def with_codes(codes, bases, mask):
    """``bases`` with every active slot set from the pattern indices ``codes`` ``[G, n]``;
    masked slots keep their old value."""
    chosen = codes_to_bases(codes, int(bases.shape[-1]), bases.dtype)
    return ops.where(ops.expand_dims(mask, 1) > 0, chosen, bases)


def refit_coordinates(bases, mask, g, h, w_old, ridge=1e-6):
    """Closed-form coordinates for fixed new bases (ALQ Eq. 23).

    Minimizes ``gᵀ(Bα − ŵ_old) + ½(Bα − ŵ_old)ᵀH(Bα − ŵ_old) + ½λ‖α‖²`` over the active
    slots: ``α = (BᵀHB + λI)⁻¹ Bᵀ(H ŵ_old − g)``, i.e. the paper's
    ``−(BᵀHB)⁻¹Bᵀ(g − H B_old α_old)``. Masked slots get 1 on the diagonal
    (so the system stays invertible) and a zero right-hand side → ``α = 0``;
    active slots get ``λ + 10⁻⁶·(BᵀHB)_ii`` (see :func:`_solve_refit`).
    """
    masked = ops.cast(bases, h.dtype) * ops.expand_dims(mask, 1)          # [G, n, I]
    gram = ops.matmul(ops.transpose(masked * ops.expand_dims(h, -1), (0, 2, 1)), masked)
    return _solve_refit(gram, project(h * w_old - g, masked), mask, ridge)


def refit_from_codes(codes, mask, g, h, w_old, ridge=1e-6):
    """:func:`refit_coordinates` for bases given by their pattern indices ``[G, n]``
    (the bases search's output; masked slots do not enter the refit).

    With ``p_k`` the sign patterns, ``BᵀHB = Σ_k H_k p_k p_kᵀ`` and
    ``Bᵀr = Σ_k r_k p_k``, where ``H_k``, ``r_k`` sum ``h`` and ``r = H ŵ_old − g``
    over the weights with code ``k``: one segment sum over ``[G, n]`` and two small
    matmuls instead of batched ``[I, n]·[n, I]`` products (TF CPU, XLA, 100k weights,
    I = 6: 0.67 vs 1.74 ms).
    """
    num_groups, size = int(codes.shape[0]), int(mask.shape[-1])
    levels_count = 2**size
    signs = sign_patterns(size)                                                # [K, I]
    patterns = ops.convert_to_tensor(signs)
    outer = ops.convert_to_tensor(np.einsum("ki,kj->kij", signs, signs).reshape(levels_count, -1))
    offsets = ops.expand_dims(ops.arange(num_groups, dtype="int32") * levels_count, 1)
    ids = ops.reshape(ops.cast(codes, "int32") + offsets, (-1,))
    data = ops.stack([ops.reshape(h, (-1,)), ops.reshape(h * w_old - g, (-1,))], axis=-1)
    sums = ops.reshape(ops.segment_sum(data, ids, num_segments=num_groups * levels_count),
                       (num_groups, levels_count, 2))
    active = ops.expand_dims(mask, 1) * ops.expand_dims(mask, 2)
    gram = ops.reshape(ops.matmul(sums[:, :, 0], outer), (num_groups, size, size)) * active
    rhs = ops.matmul(sums[:, :, 1], patterns) * mask
    return _solve_refit(gram, rhs, mask, ridge)


def _solve_refit(gram, rhs, mask, ridge):
    """``(BᵀHB + D)⁻¹ Bᵀr`` for both refits, ``D = λ + 10⁻⁶·diag(BᵀHB)`` on active slots
    (identical basis columns, as in small groups, make BᵀHB singular, and an absolute
    λ = 10⁻⁶ vanishes in float32 next to a large H) and 1 on masked ones (→ α = 0)."""
    size = int(mask.shape[-1])
    scale = ops.diagonal(gram, axis1=-2, axis2=-1)
    diagonal = (ridge + 1e-6 * scale) * mask + (1.0 - mask)
    gram = gram + ops.expand_dims(diagonal, -1) * ops.eye(size, dtype=gram.dtype)
    if in_xla():
        return cholesky_solve(gram, rhs) * mask
    return ops.squeeze(ops.solve(gram, ops.expand_dims(rhs, -1)), -1) * mask


def cholesky_solve(gram, rhs):
    """``x`` with ``gram x = rhs`` for a batch of small symmetric positive definite
    systems (``[G, I, I]``, ``[G, I]``), by a Cholesky factorisation unrolled over
    ``I`` (≤ 8): element-wise over the batch, so XLA fuses it into a few loops,
    where its batched LU of tiny matrices costs more than the whole search
    (600 systems of 6×6: 3.6 ms vs 0.55 ms, TF CPU)."""
    size = int(gram.shape[-1])
    a = [[gram[:, i, j] for j in range(size)] for i in range(size)]
    low = [[None] * size for _ in range(size)]
    for j in range(size):
        low[j][j] = ops.sqrt(a[j][j] - sum(low[j][k] * low[j][k] for k in range(j)))
        for i in range(j + 1, size):
            low[i][j] = (a[i][j] - sum(low[i][k] * low[j][k] for k in range(j))) / low[j][j]
    y = []
    for i in range(size):                                   # L y = rhs
        y.append((rhs[:, i] - sum(low[i][k] * y[k] for k in range(i))) / low[i][i])
    x = [None] * size
    for i in reversed(range(size)):                         # Lᵀ x = y
        x[i] = (y[i] - sum(low[k][i] * x[k] for k in range(i + 1, size))) / low[i][i]
    return ops.stack(x, axis=-1)


def make_positive(bases, coordinates, *moments):
    """Flip every negative ``α_i`` with its basis ``β_i`` (and α-domain first moments)."""
    sign = ops.where(coordinates < 0, -1.0, 1.0)
    flipped = tuple(m * sign for m in moments)
    return (bases * ops.expand_dims(ops.cast(sign, bases.dtype), 1), coordinates * sign) + flipped


def bases_step(bases, coordinates, mask, g, h, ridge=1e-6, moments=(), search="auto"):
    """Alg. 3 for one step: target ``ŵ − g/H``, nearest bases, Eq. 23 refit, sign fix.

    The refit runs on the search's codes (:func:`refit_from_codes`: ``[G, 2^I]``
    level sums, ``I ≤ 8``), which under XLA are computed once and read by both the
    bases and the refit (:func:`kquant.xla.materialize`; fused into each, the
    search ran twice: TF CPU, XLA, 500 groups of 200, whole step at I = 8 10.9 ms
    instead of 2.4, and 3.1 ms refitting on the bases). The sign fix of
    :func:`make_positive` is applied to the codes (a negative ``α_i`` flips bit
    ``i`` of its group's codes), so the new bases are written once, in the dtype
    ``bases`` came in (the layer's ``int8`` storage: a quarter of float32's traffic).

    α-domain first ``moments`` passed in are flipped with their α (so ``m_α``
    keeps pointing along the basis it belongs to).
    """
    w_old = decode(bases, coordinates, mask)
    codes = nearest_codes(w_old - g / h, coordinates, mask, search)
    (codes,) = materialize((codes,), g[0, 0])
    new_coordinates = refit_from_codes(codes, mask, g, h, w_old, ridge)
    negative = new_coordinates < 0
    bits = ops.convert_to_tensor((2 ** np.arange(int(mask.shape[-1]))).astype("int32"))
    flips = ops.sum(ops.where(negative, bits, 0), axis=-1, keepdims=True)        # [G, 1]
    new_bases = with_codes(ops.bitwise_xor(codes, flips), bases, mask)
    sign = ops.where(negative, -1.0, 1.0)
    return (new_bases, new_coordinates * sign) + tuple(m * sign for m in moments)


def quadratic_model(w_new, w_old, g, h):
    """``f = gᵀ(ŵ − ŵ_old) + ½(ŵ − ŵ_old)ᵀH(ŵ − ŵ_old)`` per group (ALQ Eq. 10/18)."""
    delta = w_new - w_old
    return ops.sum(g * delta + 0.5 * h * delta * delta, axis=-1)


def pruning_importance(coordinates, mask, g_alpha, h_alpha):
    """Loss increment of removing each ``α_i`` (ALQ Eq. 13): ``−g_α α + ½H_α α²``; inactive → +inf."""
    f = -g_alpha * coordinates + 0.5 * h_alpha * coordinates * coordinates
    return ops.where(mask > 0, f, np.inf)
