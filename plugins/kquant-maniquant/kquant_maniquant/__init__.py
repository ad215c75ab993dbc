"""kquant-maniquant: ManiQuant's weak-curvature gradient (WCG) for kquant.

* ``WCG`` — the estimator (entry points ``kquant.estimators: wcg`` and ``maniquant``);
* ``weak_curvature_gradient`` — the O(n) formula as a pure function;
* ``UnitClip`` — kernel constraint keeping latent weights in ``[−1, 1]``.
"""

from kquant_maniquant.wcg import WCG, UnitClip, weak_curvature_gradient

__version__ = "0.1.0"

__all__ = ["WCG", "UnitClip", "weak_curvature_gradient"]
