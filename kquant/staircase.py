"""The discrete step inside every quantizer, and its normalised coordinate.

A quantizer is ``Q(x) = post(step(pre(x)))``: ``pre`` maps the latent value to
the step's own units ``z`` (levels on the integers ``lo..hi``; or the two
levels ``±1`` of ``sign``), ``step`` is the non-differentiable staircase and
``post`` maps levels back. Gradient estimators replace ``d step/dz``.

Estimators are written in one coordinate, the signed distance to the nearest
decision boundary in units of half a step::

    s = 2 (z - b),   b = clip(floor(z) + 1/2, lo + 1/2, hi - 1/2)

so ``|s| <= 1`` exactly on the representable range ``[lo, hi]`` and ``s`` is
the same on every bin (cyclical). For ``sign``, ``s = z = x``. A smooth
surrogate ``Q̂`` that climbs one level over a bin, ``Q̂ = level + F(s)/2·Δ``,
has slope ``dQ̂/dz = F'(s)``: the estimator's :meth:`derivative`.
Ties round up (``floor(z + 1/2)``), matching ``sign(0) = +1``.
"""

from __future__ import annotations

import dataclasses

from keras import ops


@dataclasses.dataclass(frozen=True)
class Staircase:
    """Uniform levels ``lo, lo+1, …, hi`` (``binary``: the levels ``-1, +1``)."""

    lo: float
    hi: float
    binary: bool = False

    def __post_init__(self):
        if not self.hi > self.lo:
            raise ValueError(f"Staircase needs hi > lo, got lo={self.lo}, hi={self.hi}.")

    @classmethod
    def sign(cls) -> "Staircase":
        return cls(-1.0, 1.0, binary=True)

    @property
    def num_levels(self) -> int:
        return 2 if self.binary else int(self.hi - self.lo) + 1

    @property
    def width(self) -> float:
        """Distance between neighbouring levels in ``z`` units."""
        return 2.0 if self.binary else 1.0

    def hard(self, z):
        """The staircase itself: nearest level, ties up."""
        if self.binary:
            return ops.where(z >= 0, ops.ones_like(z), -ops.ones_like(z))
        return ops.floor(ops.clip(z, self.lo, self.hi) + 0.5)

    def boundary(self, z):
        """The decision boundary nearest to ``z`` (``0`` for ``sign``)."""
        if self.binary:
            return ops.zeros_like(z)
        return ops.clip(ops.floor(z) + 0.5, self.lo + 0.5, self.hi - 0.5)

    def distance(self, z):
        """Signed distance ``s`` to the nearest boundary in half steps."""
        if self.binary:
            return z
        return 2.0 * (z - self.boundary(z))

    def to_level_index(self, q):
        """Levels as integers ``0..num_levels-1`` (for bit packing)."""
        if self.binary:
            return ops.cast(q > 0, "int32")
        return ops.cast(q - self.lo, "int32")
