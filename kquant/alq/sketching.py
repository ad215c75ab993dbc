"""Structured sketching (ALQ paper, Alg. 1): float weights → binary bases.

Per group ``w`` (n weights), residual ``ε = w``; while the relative error
``‖ε‖²/‖w‖² > σ`` and ``i < min(I_max, n)``: ``β_i = sign(ε)`` (sign(0)=+1),
``α = (BᵀB)⁻¹Bᵀw`` (all coordinates refit), ``ε = w − Bα``. Then every
``α_i < 0`` flips with its basis, zero coordinates are dropped, and the active
coordinates are sorted ascending (as the authors' code does).

The paper writes the stopping test as ``‖ε ⊘ w‖² > σ`` (element-wise ratio);
that is undefined for zero weights, so like the authors' code we use the
relative squared error. Runs once at conversion time, on the host (NumPy,
float64), vectorized over groups; the loop is over bits only.
"""

from __future__ import annotations

import numpy as np


def check_max_bits(max_bits) -> int:
    if isinstance(max_bits, bool) or not isinstance(max_bits, (int, np.integer)) \
            or not 1 <= int(max_bits) <= 8:
        raise ValueError(f"`max_bits` (I_max) must be an integer in [1, 8], got {max_bits!r}.")
    return int(max_bits)


def check_sigma(sigma) -> float:
    if not isinstance(sigma, (int, float, np.floating)) or not np.isfinite(sigma) or sigma < 0:
        raise ValueError(f"`sigma` must be a finite float >= 0, got {sigma!r}.")
    return float(sigma)


def _refit(w, bases, mask):
    """Least-squares ``α`` per group on the active slots (masked slots get 0)."""
    masked_bases = bases * mask[:, None, :]
    gram = np.einsum("gni,gnj->gij", masked_bases, masked_bases)
    gram += np.eye(mask.shape[1])[None] * (1.0 - mask)[:, :, None]
    rhs = np.einsum("gni,gn->gi", masked_bases, w)
    return np.linalg.solve(gram, rhs[..., None])[..., 0] * mask


def sketch(groups, max_bits=6, sigma=1e-6):
    """Alg. 1 on ``groups`` ``[G, n]`` → ``(bases [G,n,I_max], coordinates [G,I_max], mask [G,I_max])``.

    Bases are ±1, coordinates > 0 on active slots and 0 elsewhere, float32.
    """
    max_bits = check_max_bits(max_bits)
    sigma = check_sigma(sigma)
    w = np.asarray(groups, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"`groups` must be a [G, n] array, got shape {w.shape}.")
    num_groups, n = w.shape
    bases = np.ones((num_groups, n, max_bits))
    mask = np.zeros((num_groups, max_bits))
    alpha = np.zeros((num_groups, max_bits))
    norm2 = np.sum(w * w, axis=1)
    residual = w.copy()
    for i in range(min(max_bits, n)):
        with np.errstate(divide="ignore", invalid="ignore"):
            relative = np.where(norm2 > 0, np.sum(residual**2, axis=1) / norm2, 0.0)
        grow = relative > sigma
        if not grow.any():
            break
        bases[grow, :, i] = np.where(residual[grow] >= 0, 1.0, -1.0)
        mask[grow, i] = 1.0
        alpha[grow] = _refit(w[grow], bases[grow], mask[grow])
        residual = w - np.einsum("gni,gi->gn", bases, alpha * mask)
    return finalize(bases, alpha, mask)


def finalize(bases, alpha, mask):
    """Flip negative coordinates with their bases, drop zeros, sort active ascending."""
    bases, alpha, mask = (np.array(a, dtype=np.float64) for a in (bases, alpha, mask))
    sign = np.where(alpha < 0, -1.0, 1.0)
    alpha, bases = alpha * sign, bases * sign[:, None, :]
    mask = mask * (alpha > 0)
    alpha = alpha * mask
    order = np.argsort(np.where(mask > 0, alpha, np.inf), axis=1, kind="stable")
    alpha = np.take_along_axis(alpha, order, axis=1)
    mask = np.take_along_axis(mask, order, axis=1)
    bases = np.take_along_axis(bases, order[:, None, :], axis=2)
    return bases.astype(np.float32), alpha.astype(np.float32), mask.astype(np.float32)


def reconstruct(bases, alpha, mask):
    """``ŵ = Σ_i B_i α_i mask_i`` per group, NumPy."""
    return np.einsum("gni,gi->gn", np.asarray(bases), np.asarray(alpha) * np.asarray(mask))
