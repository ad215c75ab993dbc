"""``DeltaUpdate``: refresh every adaptive EWGS δ every ``every`` training steps.

EWGS (Lee et al. 2021, Alg. 1 line 14): δ starts at 0 (or the estimator's
``delta``) and is set to ``max(0, Tr(H)/N / 3σ(g_xq))`` every ``k``
iterations (every epoch on ImageNet, every 10 on CIFAR-10); see
:func:`kquant_ewgs.hessian.estimate_deltas`. A callback has no access to the
batch being trained on, so it is given its own data and takes ``num_batches``
consecutive batches of it (cycling), averaging ``Tr(H)/N`` and ``σ`` over
them as the authors' code does (3 batches there, the default). Each trace is
Hutchinson's estimate with its own Rademacher vector per quantizer, up to
``samples`` = 50 iterations with relative tolerance ``tol`` = 1e-3 (the
authors' settings). Estimators created with ``adaptive=False`` keep their
fixed δ. A NaN/inf estimate (e.g. a non-finite batch) leaves δ unchanged.
"""

from __future__ import annotations

import keras
import numpy as np

from kquant_ewgs.hessian import estimate_deltas, ewgs_estimators


def _check_finite(name, data):
    """A NaN/inf sample would give a NaN Hessian probe, or a finite but wrong one where a
    ReLU maps it to 0: refuse the reference data before training starts."""
    if np.issubdtype(data.dtype, np.inexact):
        bad = ~np.isfinite(data)
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"DeltaUpdate: `{name}` has {int(bad.sum())} NaN/inf value(s) "
                             f"(first at index {first}); δ is estimated from finite data only.")


class DeltaUpdate(keras.callbacks.Callback):
    """Sets each adaptive EWGS δ from a Hutchinson Hessian-trace estimate every ``every`` steps."""

    def __init__(self, x, y, every=100, batch_size=32, num_batches=3, samples=50, tol=1e-3,
                 loss=None, seed=0, verbose=0):
        super().__init__()
        if int(every) < 1:
            raise ValueError(f"DeltaUpdate: `every` must be >= 1, got {every}.")
        if int(batch_size) < 1:
            raise ValueError(f"DeltaUpdate: `batch_size` must be >= 1, got {batch_size}.")
        if int(num_batches) < 1:
            raise ValueError(f"DeltaUpdate: `num_batches` must be >= 1, got {num_batches}.")
        if int(samples) < 1:
            raise ValueError(f"DeltaUpdate: `samples` must be >= 1, got {samples}.")
        self.x, self.y = np.asarray(x), np.asarray(y)
        if len(self.x) != len(self.y) or len(self.x) == 0:
            raise ValueError("DeltaUpdate: `x` and `y` must be non-empty and of equal length.")
        for name, data in (("x", self.x), ("y", self.y)):
            _check_finite(name, data)
        self.every = int(every)
        self.batch_size = int(batch_size)
        self.num_batches = int(num_batches)
        self.samples = int(samples)
        self.tol = float(tol)
        if not self.tol >= 0:
            raise ValueError(f"DeltaUpdate: `tol` must be >= 0, got {tol}.")
        self.loss = loss
        self.seed = int(seed)
        self.verbose = int(verbose)
        self.history: list[dict] = []   # per refresh: {"step", estimator name: δ}
        self._cursor = 0
        self._step = 0

    def _next_batch(self):
        n = len(self.x)
        idx = (self._cursor + np.arange(min(self.batch_size, n))) % n
        self._cursor = int((self._cursor + len(idx)) % n)
        return self.x[idx], self.y[idx]

    def refresh(self):
        """Estimate and set δ now; returns ``{estimator: δ}``."""
        model = self.model  # on JAX this syncs the training state into the variables
        estimators = ewgs_estimators(model, adaptive_only=True)
        if not estimators:
            return {}
        sums = {e: np.zeros(2) for e in estimators}  # Tr(H)/N, σ(g_xq)
        for b in range(self.num_batches):
            xb, yb = self._next_batch()
            found = estimate_deltas(model, xb, yb, loss=self.loss, estimators=estimators,
                                    samples=self.samples, tol=self.tol,
                                    seed=self.seed + 7919 * len(self.history) + b)
            for est, d in found.items():
                sums[est] += (d.trace / d.size, d.grad_std)
        deltas = {}
        for est, (curv, std) in sums.items():
            curv, std = curv / self.num_batches, std / self.num_batches
            raw = curv / (3.0 * std + 1e-12)
            if np.isfinite(raw):  # checked before the clip: max(0.0, nan) is 0.0 in Python
                est.set_delta(max(0.0, raw))
            deltas[est] = float(keras.ops.convert_to_numpy(est.delta))
        self.history.append({"step": self._step, **{e.path if hasattr(e, "path") else e.name: v
                                                   for e, v in deltas.items()}})
        if self.verbose:
            print(f"DeltaUpdate step {self._step}: " +
                  ", ".join(f"{e.name}={v:.3g}" for e, v in deltas.items()))
        return deltas

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        if self._step % self.every == 0:
            self.refresh()
