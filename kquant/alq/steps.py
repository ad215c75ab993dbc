"""The projected updates of ALQ as pure functions of tensors (``keras.ops``).

Shapes: bases ``B`` ``[G, n, I]`` (±1), coordinates ``α`` ``[G, I]``, mask
``[G, I]`` (1 = active basis), weight-domain ``g``, ``H`` ``[G, n]`` (the
quadratic model ``gᵀΔ + ½ΔᵀHΔ`` of ALQ Eq. 10 with ``g = a·m̂``, ``H = diag``).
"""

from __future__ import annotations

import numpy as np
from keras import ops


def sign_patterns(bits: int):
    """All ``2^bits`` rows ``b ∈ {±1}^bits`` (row k, column i: ``1 − 2·bit_i(k)``), float32."""
    k = np.arange(2**bits)[:, None]
    return (1.0 - 2.0 * ((k >> np.arange(bits)[None, :]) & 1)).astype("float32")


def decode(bases, coordinates, mask):
    """``ŵ_g = B_g (α_g ⊙ mask_g)`` → ``[G, n]``."""
    return ops.einsum("gni,gi->gn", bases, coordinates * mask)


def nearest_bases(target, bases, coordinates, mask):
    """Bases step (ALQ Eq. 19–20): each row ``B_{g,j}`` ← the ``b`` whose ``bᵀα_g`` is nearest ``t_{g,j}``.

    Exhaustive over all ``2^I`` sign patterns at once (masked slots have a zero
    coefficient, so they only repeat levels; they keep their old value).
    Memory ``G·n·2^I`` floats.
    """
    patterns = ops.convert_to_tensor(sign_patterns(int(bases.shape[-1])))
    levels = ops.matmul(coordinates * mask, ops.transpose(patterns))          # [G, 2^I]
    distance = ops.abs(ops.expand_dims(target, -1) - ops.expand_dims(levels, 1))  # [G, n, 2^I]
    choice = ops.argmin(distance, axis=-1)                                    # [G, n]
    chosen = ops.take(patterns, choice, axis=0)                               # [G, n, I]
    return ops.where(ops.expand_dims(mask, 1) > 0, chosen, bases)


def refit_coordinates(bases, mask, g, h, w_old, ridge=1e-6):
    """Closed-form coordinates for fixed new bases (ALQ Eq. 23).

    Minimizes ``gᵀ(Bα − ŵ_old) + ½(Bα − ŵ_old)ᵀH(Bα − ŵ_old) + ½λ‖α‖²`` over the active
    slots: ``α = (BᵀHB + λI)⁻¹ Bᵀ(H ŵ_old − g)``, i.e. the paper's
    ``−(BᵀHB)⁻¹Bᵀ(g − H B_old α_old)``. Masked slots get 1 on the diagonal
    (so the system stays invertible) and a zero right-hand side → ``α = 0``.
    """
    masked = bases * ops.expand_dims(mask, 1)
    size = int(bases.shape[-1])
    gram = ops.einsum("gni,gn,gnj->gij", masked, h, masked)
    diagonal = ridge * mask + (1.0 - mask)
    gram = gram + ops.expand_dims(diagonal, -1) * ops.eye(size, dtype=gram.dtype)
    rhs = ops.einsum("gni,gn->gi", masked, h * w_old - g)
    return ops.squeeze(ops.solve(gram, ops.expand_dims(rhs, -1)), -1) * mask


def make_positive(bases, coordinates, *moments):
    """Flip every negative ``α_i`` with its basis ``β_i`` (and α-domain first moments)."""
    sign = ops.where(coordinates < 0, -1.0, 1.0)
    flipped = tuple(m * sign for m in moments)
    return (bases * ops.expand_dims(sign, 1), coordinates * sign) + flipped


def bases_step(bases, coordinates, mask, g, h, ridge=1e-6):
    """Alg. 3 for one step: target ``ŵ − g/H``, nearest bases, Eq. 23 refit, sign fix."""
    w_old = decode(bases, coordinates, mask)
    new_bases = nearest_bases(w_old - g / h, bases, coordinates, mask)
    new_coordinates = refit_coordinates(new_bases, mask, g, h, w_old, ridge)
    return make_positive(new_bases, new_coordinates)


def quadratic_model(w_new, w_old, g, h):
    """``f = gᵀ(ŵ − ŵ_old) + ½(ŵ − ŵ_old)ᵀH(ŵ − ŵ_old)`` per group (ALQ Eq. 10/18)."""
    delta = w_new - w_old
    return ops.sum(g * delta + 0.5 * h * delta * delta, axis=-1)


def pruning_importance(coordinates, mask, g_alpha, h_alpha):
    """Loss increment of removing each ``α_i`` (ALQ Eq. 13): ``−g_α α + ½H_α α²``; inactive → +inf."""
    f = -g_alpha * coordinates + 0.5 * h_alpha * coordinates * coordinates
    return ops.where(mask > 0, f, np.inf)
