"""Larq's ``WeightClip`` constraint (``kernel_constraint="weight_clip"``)."""

import keras
from keras import ops

from kquant.validation import check_number


@keras.saving.register_keras_serializable(package="kquant_compat")
class WeightClip(keras.constraints.Constraint):
    """Larq weight_clip: clip the latent weights to ``[−clip_value, clip_value]``."""

    def __init__(self, clip_value=1.0):
        self.clip_value = check_number(clip_value, "clip_value", gt=0)

    def __call__(self, x):
        return ops.clip(x, -self.clip_value, self.clip_value)

    def get_config(self):
        return {"clip_value": self.clip_value}


weight_clip = WeightClip

#: Larq's constraint names, resolved by ``kquant_compat.larq.layers``.
CONSTRAINTS = {"weight_clip": WeightClip, "WeightClip": WeightClip}


def get(identifier):
    """A constraint from a Larq name (``"weight_clip"``) or what ``keras.constraints.get`` takes."""
    if isinstance(identifier, str) and identifier in CONSTRAINTS:
        return CONSTRAINTS[identifier]()
    return keras.constraints.get(identifier)

__all__ = ["CONSTRAINTS", "WeightClip", "get", "weight_clip"]
