"""EDE, error decay estimator (Qin et al. 2020, IR-Net).

``Q̂(s) = k·tanh(t·s)``, so ``F'(s) = k·t·(1 − tanh²(t·s))``, with
``t = t_min·(t_max/t_min)^p`` growing and ``k = max(1/t, 1)`` shrinking over
training progress ``p ∈ [0, 1]``. The defaults give ``t = 10^(−3 + 4p)``.
``t`` and ``k`` live in non-trainable variables, so the schedule is driven by
:class:`kquant.callbacks.EDESchedule` and saved with the model.
"""


from keras import ops

from kquant.estimators.base import ElementwiseEstimator
from kquant.validation import check_number


def ede_schedule(progress, t_min=1e-3, t_max=10.0):
    """``(t, k)`` at training progress ``p`` (clamped to [0, 1])."""
    p = min(max(float(progress), 0.0), 1.0)
    t = t_min * (t_max / t_min) ** p
    return t, max(1.0 / t, 1.0)


class EDE(ElementwiseEstimator):
    """EDE (IR-Net): F'(s) = k·t·(1 − tanh²(t s)), t and k scheduled by training progress."""

    def __init__(self, t_min=1e-3, t_max=10.0, **kwargs):
        super().__init__(**kwargs)
        t_min = check_number(t_min, "t_min", gt=0)
        t_max = check_number(t_max, "t_max", gt=0)
        if not t_min < t_max:
            raise ValueError(f"EDE: need 0 < `t_min` < `t_max`, got t_min={t_min}, t_max={t_max}.")
        self.t_min, self.t_max = t_min, t_max

    def build(self, input_shape=None):
        t0, k0 = ede_schedule(0.0, self.t_min, self.t_max)
        const = lambda v: (lambda shape, dtype=None: ops.cast(v, dtype or "float32"))  # noqa: E731
        self.t = self.add_weight(name="t", shape=(), initializer=const(t0), trainable=False)
        self.k = self.add_weight(name="k", shape=(), initializer=const(k0), trainable=False)
        self.built = True

    def set_progress(self, progress):
        """Move ``t`` and ``k`` to training progress ``p``."""
        t, k = ede_schedule(progress, self.t_min, self.t_max)
        self.t.assign(t)
        self.k.assign(k)

    def derivative(self, s):
        t = ops.cast(ops.convert_to_tensor(self.t), s.dtype)
        k = ops.cast(ops.convert_to_tensor(self.k), s.dtype)
        th = ops.tanh(t * s)
        return k * t * (1.0 - th * th)

    def surrogate(self, s):
        t = ops.cast(ops.convert_to_tensor(self.t), s.dtype)
        k = ops.cast(ops.convert_to_tensor(self.k), s.dtype)
        return k * ops.tanh(t * s)

    def get_config(self):
        return {"t_min": self.t_min, "t_max": self.t_max}


