"""α and M: a custom estimator is an STE in disguise.

"Custom gradient estimators are straight-through estimators in disguise"
(Eq. 4): for a uniform quantizer with bin width Δ and a cyclical, positive
estimator Q̂', an STE net with learning rate ``α·η`` and initial weights
``M(w₀)`` trains like the Q̂ net with learning rate ``η`` (SGD), where::

    α = Δ / ∫_{w−}^{w+} dw / Q̂'(w)          (binary quantizer: α = 1)
    M(w) = w_b + α ∫_{w_b}^{w} dv / Q̂'(v)    (w_b a boundary: M fixes boundaries)

In kquant's coordinates (:mod:`kquant.staircase`) an elementwise estimator
gives the slope ``F'(s)`` of the boundary distance ``s = 2(z − b)/width``,
``z = (x − m)/Δ``, and ``dQ̂/dx = F'(s)``. One period ``s ∈ [−1, 1]`` runs
level to level with the boundary at ``s = 0``; a bin is ``width/2`` of it in
``z``, so with ``G(s) = ∫_0^s du / F'(u)``::

    α = 2 / (width · (G(1) − G(−1)))         (independent of Δ)
    M(x) = m + Δ·(b + α·width/2 · G(s))   =   x + Δ·width/2·(α G(s) − s)

For HTGE, ``F'(s) = t/2·sech²(ts/2)`` gives ``1/F' = (1 + cosh ts)/t`` and the
closed form ``α = t² / (t + sinh t)``.

Outside the representable range (``|s| > 1``) the integral continues where
``F' > 0`` (MAD, STE); past the point ``c`` where ``F'`` vanishes (HTGE,
clipped STE) the weight can no longer move in either net, so ``M`` continues
by translation and the STE twin is a PWL (clipped STE) estimator whose range
is ``[M(w_min), M(w_max)]`` (paper, Appendix G).

``G`` is tabulated once on ``[−1, 1]`` (cumulative trapezoid, ``s = 0`` a node
so ``G(0) = 0`` and ``M(boundary) = boundary`` exactly) and interpolated,
vectorised over any number of weights; tails are integrated on demand.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
from keras import ops

from kquant.estimators import ElementwiseEstimator, Estimator
from kquant.estimators import get as get_estimator
from kquant.staircase import Staircase

#: Nodes of the table of G on [−1, 1] (odd, so that s = 0 is a node).
TABLE_NODES = 2**14 + 1
#: How far beyond the range (in half steps) the tails are probed for a cutoff.
TAIL_PROBE = 64.0
#: Tail integration nodes per unit of s.
TAIL_DENSITY = 4096


class NotEquivalentError(ValueError):
    """The estimator or quantizer is outside the assumptions of the STE-equivalence theorem."""


def _derivative_fn(estimator: ElementwiseEstimator, staircase=None) -> Callable[[np.ndarray], np.ndarray]:
    """``F'`` as a NumPy function, evaluated in float32 (the training precision).

    Estimators whose tail depends on the staircase (MAD's ``c/|x|``) get it.
    """
    import inspect

    takes_staircase = "staircase" in inspect.signature(estimator.derivative).parameters

    def fn(s):
        s = ops.convert_to_tensor(np.asarray(s, dtype="float32"))
        d = estimator.derivative(s, staircase) if takes_staircase else estimator.derivative(s)
        return np.asarray(ops.convert_to_numpy(d), dtype="float64")

    return fn


def _check_estimator(estimator) -> ElementwiseEstimator:
    estimator = get_estimator(estimator)
    if not isinstance(estimator, ElementwiseEstimator) or estimator.uses_latent:
        raise NotEquivalentError(
            f"`estimator` {estimator!r} is not an elementwise estimator F'(s): α and M are "
            "defined only for cyclical estimators (the same slope on every bin)."
        )
    if not estimator.built:
        estimator.build(None)
    return estimator


def _cumulative_trapezoid(x, y):
    out = np.zeros_like(x)
    out[1:] = np.cumsum(0.5 * (y[1:] + y[:-1]) * np.diff(x))
    return out


def _find_cutoff(fprime, sign):
    """First ``|s| ≥ 1`` (direction ``sign``) where ``F'`` vanishes for good, or ``None``.

    Probes ``TAIL_PROBE`` half steps past the range; the zero is located by
    bisection and snapped to 1 when within float32 resolution of the range edge.
    """
    probe = np.linspace(1.0, 1.0 + TAIL_PROBE, int(TAIL_PROBE * 64) + 1)
    values = fprime(sign * probe)
    if np.any(~np.isfinite(values)):
        raise NotEquivalentError("F'(s) is not finite outside the representable range.")
    if np.any(values < 0):
        raise NotEquivalentError(
            f"F'(s) is negative at s = {sign * probe[values < 0][0]:.4g}: a negative estimator "
            "moves weights against the gradient (paper, Appendix G)."
        )
    zeros = np.nonzero(values == 0)[0]
    if zeros.size == 0:
        return None
    first = zeros[0]
    if np.any(values[first:] > 0):
        raise NotEquivalentError(
            f"F'(s) vanishes at s = {sign * probe[first]:.4g} and is positive again further out: "
            "weights there are cut off from the range, which no PWL twin reproduces."
        )
    lo, hi = probe[max(first - 1, 0)], probe[first]
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if fprime(np.array([sign * mid]))[0] > 0:
            lo = mid
        else:
            hi = mid
    return 1.0 if lo - 1.0 < 1e-6 else float(lo)


@dataclasses.dataclass(frozen=True)
class Equivalence:
    """α, M and the STE twin of one (elementwise estimator, uniform quantizer) pair.

    Build it with :func:`equivalence`. ``self(w)`` is ``M(w)`` (NumPy, any shape).
    """

    alpha: float
    staircase: Staircase
    step: float
    offset: float
    lower_cutoff: float | None  # |s| below the range where F' vanishes; None: never
    upper_cutoff: float | None
    derivative: Callable[[np.ndarray], np.ndarray] = dataclasses.field(repr=False)
    _s: np.ndarray = dataclasses.field(repr=False)
    _g: np.ndarray = dataclasses.field(repr=False)

    @property
    def binary(self) -> bool:
        return self.staircase.binary

    @property
    def representable_range(self) -> tuple[float, float]:
        """``[w_min, w_max]`` in weight units (binary: ``[−1, 1]``, the PWL convention)."""
        st = self.staircase
        return (self.offset + self.step * st.lo, self.offset + self.step * st.hi)

    # -- G(s) = ∫_0^s du / F'(u), any s --------------------------------------------
    def _tail(self, s, sign):
        """``G`` for ``sign·s ≥ 1`` (``s`` has that sign)."""
        a = sign * s
        cutoff = self.upper_cutoff if sign > 0 else self.lower_cutoff
        edge = self._g[-1] if sign > 0 else self._g[0]
        reach = float(a.max()) if cutoff is None else float(min(a.max(), cutoff))
        integral = np.zeros_like(a)
        if reach > 1.0:
            n = int(min(2**20, max(2, math.ceil((reach - 1.0) * TAIL_DENSITY)) + 1))
            grid = np.linspace(1.0, reach, n)
            fp = self.derivative(sign * grid)
            if np.any(fp <= 0) or np.any(~np.isfinite(fp)):
                raise NotEquivalentError(
                    f"F'(s) vanishes or is not finite between s = ±1 and ±{reach:.4g}: "
                    "∫ ds/F'(s) diverges there."
                )
            table = _cumulative_trapezoid(grid, 1.0 / fp)
            integral = np.interp(np.minimum(a, reach), grid, table)
        if cutoff is not None:
            integral = integral + np.maximum(a - cutoff, 0.0) / self.alpha
        return edge + sign * integral

    def g(self, s):
        """``G(s) = ∫_0^s du / F'(u)`` (past a cutoff: slope ``1/α``, a translation of M)."""
        s = np.asarray(s, dtype="float64")
        out = np.interp(s, self._s, self._g)
        up, down = s > 1.0, s < -1.0
        if np.any(up):
            out[up] = self._tail(s[up], 1.0)
        if np.any(down):
            out[down] = self._tail(s[down], -1.0)
        return out

    # -- M -------------------------------------------------------------------
    def distance(self, w):
        """``s`` of weights ``w`` (NumPy twin of :meth:`Staircase.distance`)."""
        z = (np.asarray(w, dtype="float64") - self.offset) / self.step
        st = self.staircase
        if st.binary:
            return z
        b = np.clip(np.floor(z) + 0.5, st.lo + 0.5, st.hi - 0.5)
        return 2.0 * (z - b) / st.width

    def __call__(self, w):
        """``M(w) = w + Δ·width/2·(α G(s) − s)``: boundaries are fixed points."""
        w = np.asarray(w, dtype="float64")
        s = self.distance(w).reshape(-1)
        correction = self.alpha * self.g(s) - s
        return w + self.step * self.staircase.width / 2.0 * correction.reshape(w.shape)

    # -- the STE twin -----------------------------------------------------------
    def _twin_clip(self, sign):
        cutoff = self.upper_cutoff if sign > 0 else self.lower_cutoff
        return None if cutoff is None else abs(self.alpha * float(self.g(np.array([sign * cutoff]))[0]))

    @property
    def pwl_range(self) -> tuple[float, float] | None:
        """``[M(w_min), M(w_max)]`` where the estimator vanishes outside a range, else ``None``."""
        if self.lower_cutoff is None and self.upper_cutoff is None:
            return None
        st = self.staircase
        if st.binary:
            lo_x = -math.inf if self.lower_cutoff is None else -self.lower_cutoff
            hi_x = math.inf if self.upper_cutoff is None else self.upper_cutoff
        else:
            lo_b, hi_b = st.lo + 0.5, st.hi - 0.5
            lo_x = (-math.inf if self.lower_cutoff is None else
                    self.offset + self.step * (lo_b - self.lower_cutoff * st.width / 2.0))
            hi_x = (math.inf if self.upper_cutoff is None else
                    self.offset + self.step * (hi_b + self.upper_cutoff * st.width / 2.0))
        mapped = [float(self(np.array([v]))[0]) if math.isfinite(v) else v for v in (lo_x, hi_x)]
        return (mapped[0], mapped[1])

    def twin_estimator(self) -> Estimator:
        """The SGD twin's estimator: ``ste``, or ``clipped_ste`` with the mapped range."""
        lo, hi = self._twin_clip(-1.0), self._twin_clip(1.0)
        if lo is None and hi is None:
            return get_estimator("ste")
        if lo is None or hi is None or abs(lo - hi) > 1e-6 * max(lo, hi):
            raise NotEquivalentError(
                f"The PWL twin needs the clip range s ∈ [−{lo}, {hi}] (None: unbounded), which "
                "the symmetric clipped_ste cannot express."
            )
        clip = 0.5 * (lo + hi)
        if abs(clip - 1.0) < 1e-6:
            clip = 1.0
        return get_estimator("clipped_ste", clip=clip)


def _quantizer_geometry(quantizer):
    """``(staircase, Δ, m)`` of a quantizer the theorem covers, else a clear error."""
    from kquant.quantizers import BWN, DoReFa, Sign, Uniform

    if isinstance(quantizer, BWN):
        raise NotEquivalentError(
            "`quantizer` BWN scales by mean|W|, which M would change: the forward pass of the "
            "twin would differ. Use Sign or Uniform with a fixed `step`."
        )
    if isinstance(quantizer, Sign):
        return quantizer.staircase, 1.0, 0.0
    if isinstance(quantizer, Uniform):
        if quantizer.step is None:
            raise NotEquivalentError(
                "`quantizer` Uniform has a learnable step (step=None); the equivalence needs a "
                "fixed bin width Δ: pass `step=`."
            )
        return quantizer.staircase, float(quantizer.step), float(quantizer.offset)
    if isinstance(quantizer, DoReFa):
        raise NotEquivalentError(
            "`quantizer` DoReFa is not uniform in the latent weight (tanh and a max-normalisation "
            "come first): the theorem needs a uniform quantizer (Uniform with a fixed step, Sign)."
        )
    raise NotEquivalentError(
        f"`quantizer` {type(quantizer).__name__} is not supported: use Uniform with a fixed "
        "`step`, or Sign."
    )


def equivalence(estimator=None, quantizer=None, *, staircase=None, step=1.0, offset=0.0,
                nodes=TABLE_NODES) -> Equivalence:
    """α and M for ``estimator`` (default: the quantizer's own) on ``quantizer``.

    Either ``quantizer`` (Uniform with a fixed step, or Sign) or the geometry
    ``staircase`` + ``step`` (Δ) + ``offset`` (m). Raises
    :class:`NotEquivalentError` where the theorem does not apply: a
    non-elementwise estimator, or ``F'(s) ≤ 0`` somewhere on the representable
    range (Assumption 5.1.1 needs ``Q̂' ≥ L₋ > 0``; e.g. ApproxSign vanishes at
    ``|s| = 1`` and ``∫ ds/F'(s)`` diverges there, SwishSign turns negative).
    """
    if quantizer is not None:
        if staircase is not None:
            raise ValueError("Pass either `quantizer` or `staircase`, not both.")
        staircase, step, offset = _quantizer_geometry(quantizer)
        if estimator is None:
            estimator = quantizer.estimator
    if staircase is None:
        raise ValueError("Pass `quantizer` or `staircase` (with `step` and `offset`).")
    if estimator is None:
        raise ValueError("`estimator` is required when no `quantizer` is given.")
    step, offset = float(step), float(offset)
    if not (step > 0 and math.isfinite(step)):
        raise ValueError(f"`step` must be a positive finite float, got {step}.")
    nodes = int(nodes)
    if nodes < 3 or nodes % 2 == 0:
        raise ValueError(f"`nodes` must be an odd integer >= 3, got {nodes}.")
    estimator = _check_estimator(estimator)
    s, g, alpha, cutoffs, fprime = _tabulate(estimator, staircase, nodes)
    return Equivalence(
        alpha=alpha,
        staircase=staircase,
        step=step,
        offset=offset,
        lower_cutoff=cutoffs[0],
        upper_cutoff=cutoffs[1],
        derivative=fprime,
        _s=s,
        _g=g,
    )


_TABLES: dict = {}


def _estimator_key(estimator):
    """Cache key of a stateless estimator (``None``: stateful, not cached)."""
    if estimator.weights:
        return None
    return (type(estimator), repr(sorted(estimator.get_config().items())))


def _tabulate(estimator, staircase, nodes):
    """``(s, G(s), α, cutoffs, F')``; cached for stateless estimators (it does not depend on Δ)."""
    est_key = _estimator_key(estimator)
    key = (est_key, staircase.binary, staircase.lo, staircase.hi, nodes)
    if est_key is not None and key in _TABLES:
        return _TABLES[key]
    fprime = _derivative_fn(estimator, staircase)
    s = np.linspace(-1.0, 1.0, nodes)
    s[nodes // 2] = 0.0
    fp = fprime(s)
    name = repr(estimator)
    if np.any(~np.isfinite(fp)):
        raise NotEquivalentError(f"{name}: F'(s) is not finite on the representable range.")
    if np.any(fp < 0):
        where = s[fp < 0][0]
        raise NotEquivalentError(
            f"{name} is negative at s = {where:.4g} on the representable range: a negative "
            "estimator moves weights against the gradient and has no STE twin (paper, Appendix G)."
        )
    if np.any(fp == 0):
        where = s[fp == 0]
        raise NotEquivalentError(
            f"{name} vanishes at s = {where[0]:.4g} (|s| ≤ 1 is the representable range): "
            "∫ ds/F'(s) diverges there, so α and M do not exist (Assumption 5.1.1 needs "
            "Q̂' ≥ L₋ > 0)."
        )
    g = _cumulative_trapezoid(s, 1.0 / fp)
    g = g - g[nodes // 2]  # G(0) = 0 exactly
    g[nodes // 2] = 0.0
    alpha = 1.0 if staircase.binary else 2.0 / (staircase.width * (g[-1] - g[0]))
    cutoffs = (_find_cutoff(fprime, -1.0), _find_cutoff(fprime, 1.0))
    s.setflags(write=False)
    g.setflags(write=False)
    result = (s, g, float(alpha), cutoffs, fprime)
    if est_key is not None:
        _TABLES[key] = result
        if len(_TABLES) > 64:
            _TABLES.pop(next(iter(_TABLES)))
    return result


def lr_factor(estimator=None, quantizer=None, **geometry) -> float:
    """The learning-rate factor α of the STE twin (binary: 1)."""
    return equivalence(estimator, quantizer, **geometry).alpha


def weight_map(estimator=None, quantizer=None, **geometry) -> Callable[[np.ndarray], np.ndarray]:
    """``M`` as a NumPy function (see :class:`Equivalence`)."""
    return equivalence(estimator, quantizer, **geometry)


def htge_alpha(t: float) -> float:
    """Closed form for HTGE: ``α = t² / (t + sinh t)`` (``∫ cosh²(tu/2) du`` via sinh)."""
    return t * t / (t + math.sinh(t))
