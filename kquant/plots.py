"""Figures of the installed gradient estimators (``kquant plot estimators``, the docs).

Every elementwise estimator is a surrogate ``F(s)`` of the sign step in the
boundary coordinate ``s`` (``kquant/staircase.py``) with slope ``F'(s)``;
:func:`estimator_curves` evaluates both from the registry, and
:func:`plot_estimators` draws one PNG per estimator plus one with all of
them. Whole-tensor estimators (EWGS, MetaQuant, ...) have no elementwise
curve and are listed as such. Needs matplotlib (``pip install 'kquant[plots]'``).
"""

from __future__ import annotations

import os

import numpy as np


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("Plots need matplotlib: pip install 'kquant[plots]'.") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def estimator_curves(s_range=3.0, points=601):
    """``{name: (s, F(s), F'(s))}`` for every installed elementwise estimator.

    ``F`` is the closed-form surrogate where the estimator has one, else the
    integral of ``F'`` from 0 (the sign step's surrogate is odd). Also returns
    ``{name: reason}`` for the estimators that cannot be drawn.
    """
    from keras import ops

    from kquant.estimators import ElementwiseEstimator, registry

    s = np.linspace(-s_range, s_range, points).astype("float32")
    curves, skipped = {}, {}
    for info in registry.info():
        try:
            est = registry.get(info.name)
        except Exception as e:  # a plugin that cannot be built with defaults
            skipped[info.name] = f"cannot be built with default arguments ({type(e).__name__}: {e})"
            continue
        if not isinstance(est, ElementwiseEstimator):
            skipped[info.name] = "whole-tensor estimator (no elementwise surrogate)"
            continue
        try:
            est.build()
            d = np.asarray(ops.convert_to_numpy(est.derivative(ops.convert_to_tensor(s))), "float64")
            d = np.broadcast_to(d, s.shape)
        except Exception as e:
            skipped[info.name] = f"derivative failed ({type(e).__name__}: {e})"
            continue
        try:
            f = np.asarray(ops.convert_to_numpy(est.surrogate(ops.convert_to_tensor(s))), "float64")
        except Exception:
            # trapezoid integral of F' from s = 0, F(0) = 0
            steps = np.concatenate([[0.0], np.cumsum((d[1:] + d[:-1]) / 2 * np.diff(s))])
            f = steps - np.interp(0.0, s, steps)
        curves[info.name] = (s, np.broadcast_to(f, s.shape), d)
    return curves, skipped


def draw(ax_f, ax_d, name, s, f, d):
    ax_f.plot(s, np.sign(s), color="0.6", lw=1, label="sign (forward)")
    ax_f.plot(s, f, lw=1.6, label="surrogate F(s)")
    ax_d.plot(s, d, lw=1.6, color="C1")
    ax_f.set_title(f"{name}: surrogate F(s)")
    ax_d.set_title(f"{name}: derivative F'(s)")
    for ax in (ax_f, ax_d):
        ax.axvspan(-1, 1, color="C0", alpha=0.06)
        ax.set_xlabel("s (half steps to the boundary)")
        ax.grid(alpha=0.3)
    ax_f.legend(loc="upper left", fontsize="small")


def plot_estimators(out_dir, s_range=3.0):
    """Write ``NAME.png`` per estimator and ``estimators.png`` (all) to ``out_dir``.

    Returns ``({name: path}, {name: why not drawn})`` (``"all"``: the overview).
    """
    plt = _pyplot()
    os.makedirs(out_dir, exist_ok=True)
    curves, skipped = estimator_curves(s_range)
    written = {}
    for name, (s, f, d) in curves.items():
        fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3))
        draw(a, b, name, s, f, d)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{name}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written[name] = path
    if curves:
        fig = overview(curves, plt)
        path = os.path.join(out_dir, "estimators.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written["all"] = path
    return written, skipped


def overview(curves=None, plt=None):
    """One figure: every estimator's derivative F'(s) over the others."""
    plt = plt or _pyplot()
    curves = curves if curves is not None else estimator_curves()[0]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, (s, f, d) in curves.items():
        a.plot(s, f, lw=1.3, label=name)
        b.plot(s, d, lw=1.3, label=name)
    a.set_title("surrogates F(s)")
    b.set_title("derivatives F'(s)")
    for ax in (a, b):
        ax.axvspan(-1, 1, color="C0", alpha=0.06)
        ax.set_xlabel("s (half steps to the boundary)")
        ax.grid(alpha=0.3)
    b.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    return fig
