"""Hessian traces w.r.t. the discrete values, and EWGS's δ from them.

EWGS (Lee et al. 2021, §3.2, Eqs. 8–10): for each quantizer,
``δ = max(0, (Tr(H)/N) / G)`` where ``H = ∂²ℓ/∂x_q²`` is the Hessian of the
loss w.r.t. the quantizer's ``N`` discrete values ``x_q`` and
``G = 3σ(g_xq)``. ``Tr(H) = E[vᵀHv]`` (Hutchinson, Rademacher ``v``), and
``Hv = ∂(g_xqᵀv)/∂x_q`` is a Hessian-vector product — a second backward pass
(TensorFlow: nested ``GradientTape``\\ s; JAX: ``jvp`` of ``grad``), the only
backend-specific code here (:func:`_backend_grad_and_hvp`).

To differentiate w.r.t. ``x_q``, a tensor inside the model, every EWGS
estimator adds a *probe* ``p`` (zero) to its step's output ``q`` for the
duration of the estimate: ``ℓ(p)`` is then an ordinary function whose
gradient and Hessian at ``p = 0`` are those w.r.t. ``q``. The model runs
through ``stateless_call``, so the estimate changes no variable (batch-norm
statistics, quantizer initialisation). ``q`` is in staircase units, with
``x_q = (q − lo)/(hi − lo)``, so ``g_xq = (hi − lo)·g_q`` and
``H_xq = (hi − lo)²·H_q``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref

import keras
import numpy as np
from keras import ops


def _backend_grad_and_hvp(fn):
    """Compile ``(primals, tangents, *args) -> (∇fn, ∇²fn·tangents)`` for a scalar
    ``fn(primals: list, *args)``, differentiating w.r.t. ``primals`` only.

    TensorFlow: nested ``GradientTape``\\ s in a ``tf.function``; JAX: ``jvp`` of
    ``grad`` under ``jit``; torch: ``autograd.grad`` with ``create_graph``. The one
    backend-specific seam of the package.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function(reduce_retracing=True)
        def grad_and_hvp(primals, tangents, *args):
            with tf.GradientTape() as outer:
                outer.watch(primals)
                with tf.GradientTape() as inner:
                    inner.watch(primals)
                    value = fn(list(primals), *args)
                grads = inner.gradient(value, primals,
                                       unconnected_gradients=tf.UnconnectedGradients.ZERO)
                dot = tf.add_n([tf.reduce_sum(g * t) for g, t in zip(grads, tangents)])
            hvps = outer.gradient(dot, primals, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return grads, hvps

        return grad_and_hvp
    if backend == "jax":
        import jax

        @jax.jit
        def grad_and_hvp(primals, tangents, *args):
            return jax.jvp(lambda p: jax.grad(fn)(p, *args), (list(primals),), (list(tangents),))

        return grad_and_hvp
    if backend == "torch":
        import torch

        def grad_and_hvp(primals, tangents, *args):
            primals = [p.detach().requires_grad_(True) for p in primals]
            with torch.enable_grad():
                value = fn(primals, *args)
                grads = torch.autograd.grad(value, primals, create_graph=True, allow_unused=True)
                grads = [torch.zeros_like(p) if g is None else g for p, g in zip(primals, grads)]
                dot = sum(torch.sum(g * t) for g, t in zip(grads, tangents))
                hvps = torch.autograd.grad(dot, primals, allow_unused=True)
            return ([g.detach() for g in grads],
                    [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(primals, hvps)])

        return grad_and_hvp
    raise NotImplementedError(
        f"kquant_ewgs: Hessian-vector products are implemented for the TensorFlow, JAX and "
        f"torch backends, not {backend!r} (a fixed δ works on every backend)."
    )


def hutchinson_trace(fn, primals, samples=50, seed=0, args=(), compiled=None, tol=1e-3):
    """Per-tensor Hutchinson estimates of ``Tr(H_ii)`` and the gradient at ``primals``.

    ``fn(list_of_tensors, *args) -> scalar``. As in the EWGS authors' code
    (PyHessian's ``trace``), each tensor ``i`` gets its own Rademacher ``v_i``
    and its own Hessian-vector product (tangent ``v_i`` on block ``i`` only, so
    no cross-block terms ``v_iᵀH_ij v_j`` add variance); its estimate is the
    running mean of ``v_iᵀ(H v_i)_i``, stopped once it changes by less than
    ``tol`` relative (``|m_k − m_{k−1}| < tol·(|m_{k−1}| + 1e-6)``) or after
    ``samples`` iterations (authors: 50, ``tol`` 1e-3; ``tol=0``: always
    ``samples``). ``compiled``: a :func:`_backend_grad_and_hvp` of ``fn`` to
    reuse. Returns ``(traces: np.ndarray[len(primals)], grads: list[np.ndarray])``;
    ``hutchinson_trace.iterations`` holds the iterations each tensor used.
    """
    if int(samples) < 1:
        raise ValueError(f"hutchinson_trace: `samples` must be >= 1, got {samples}.")
    tol = float(tol)
    if not tol >= 0:
        raise ValueError(f"hutchinson_trace: `tol` must be >= 0, got {tol}.")
    grad_and_hvp = compiled or _backend_grad_and_hvp(fn)
    rng = np.random.default_rng(seed)
    primals = [ops.convert_to_tensor(p) for p in primals]
    zeros = [np.zeros(tuple(p.shape), "float32") for p in primals]
    traces = np.zeros(len(primals))
    iterations = np.zeros(len(primals), int)
    grads = None
    for i, p in enumerate(primals):
        values, mean = [], None
        for _ in range(int(samples)):
            v = rng.choice(np.array([-1.0, 1.0], "float32"), size=tuple(p.shape))
            tangents = list(zeros)
            tangents[i] = v
            g, hv = grad_and_hvp(primals, [ops.convert_to_tensor(t) for t in tangents], *args)
            if grads is None:
                grads = [ops.convert_to_numpy(x) for x in g]
            values.append(float(np.sum(v * ops.convert_to_numpy(hv[i]))))
            new_mean = float(np.mean(values))
            converged = mean is not None and abs(new_mean - mean) < tol * (abs(mean) + 1e-6)
            mean = new_mean
            if converged or not np.isfinite(mean):
                break
        traces[i], iterations[i] = mean, len(values)
    hutchinson_trace.iterations = iterations
    return traces, grads


@dataclasses.dataclass
class DeltaEstimate:
    """What δ was computed from, for one estimator (all its calls together)."""

    delta: float
    trace: float        # Tr(H) w.r.t. x_q (estimated)
    size: int           # N, number of discrete values
    grad_std: float     # σ(g_xq)


# model -> {(loss, training, calls): (fn, compiled grad-and-HVP)}, dropped with the model.
_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def _probes(estimators, probe):
    try:
        for est in estimators:
            est._probe = probe
        yield
    finally:
        for est in estimators:
            est._probe = None


def ewgs_estimators(model, adaptive_only=False):
    """The EWGS estimators of ``model``'s quantized layers, in layer order."""
    from kquant.callbacks import estimators_in
    from kquant_ewgs.estimator import EWGS

    found = estimators_in(model, EWGS)
    return [e for e in found if e.adaptive] if adaptive_only else found


def estimate_deltas(model, x, y, loss=None, estimators=None, samples=50, seed=0,
                    training=True, eps=1e-12, tol=1e-3):
    """EWGS's δ for each estimator from one batch ``(x, y)``: ``{estimator: DeltaEstimate}``.

    ``loss``: a Keras loss (name or callable ``loss(y_true, y_pred)``); default
    the model's compiled loss. Variables are not changed.
    """
    if estimators is None:
        estimators = ewgs_estimators(model)
    estimators = list(estimators)
    if not estimators:
        return {}
    loss_fn = keras.losses.get(loss if loss is not None else model.loss)
    if loss_fn is None:
        raise ValueError("estimate_deltas: pass `loss` or compile the model with a loss.")
    x = ops.convert_to_tensor(x)
    y = ops.convert_to_tensor(y)
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    calls = []  # (estimator, shape, span) per step call, in call order

    def record(est, q, staircase):
        calls.append((est, tuple(q.shape), float(staircase.hi - staircase.lo)))
        return q

    with _probes(estimators, record):
        model.stateless_call(trainable, non_trainable, x, training=training)
    if not calls:
        return {}

    key = (id(loss_fn), bool(training), len(calls))
    cache = _COMPILED.setdefault(model, {})
    if key not in cache:
        def loss_of_probes(ps, trainable, non_trainable, x, y):
            it = iter(ps)

            def add(est, q, staircase):
                return q + ops.cast(next(it), q.dtype)

            with _probes(estimators, add):
                out, _ = model.stateless_call(trainable, non_trainable, x, training=training)
            return ops.mean(loss_fn(y, out))  # functions like "mse" return per-example values

        cache.clear()
        cache[key] = (loss_of_probes, _backend_grad_and_hvp(loss_of_probes))
    loss_of_probes, compiled = cache[key]

    zeros = [np.zeros(shape, "float32") for _, shape, _ in calls]
    traces_q, grads_q = hutchinson_trace(loss_of_probes, zeros, samples=samples, seed=seed,
                                         args=(trainable, non_trainable, x, y), compiled=compiled,
                                         tol=tol)

    result = {}
    for est in estimators:
        idx = [i for i, c in enumerate(calls) if c[0] is est]
        if not idx:
            continue
        trace = sum(calls[i][2] ** 2 * traces_q[i] for i in idx)          # H_xq = span²·H_q
        g_xq = np.concatenate([calls[i][2] * grads_q[i].ravel() for i in idx])
        size = int(g_xq.size)
        std = float(np.std(g_xq))
        raw = (trace / size) / (3.0 * std + eps)
        delta = max(0.0, raw) if np.isfinite(raw) else float("nan")  # max(0, nan) is 0 in Python
        result[est] = DeltaEstimate(delta=delta, trace=float(trace), size=size, grad_std=std)
    return result
