"""STE equivalence ("Custom gradient estimators are straight-through estimators in disguise").

* :func:`equivalence` / :func:`lr_factor` / :func:`weight_map`: α and M of an
  elementwise estimator on a uniform (or sign) quantizer.
* :func:`to_ste`: the STE twin of a model and its optimizer.
* :func:`alignment_error`, :func:`weight_agreement`, :class:`AlignmentRecorder`,
  :func:`fit_in_lockstep`: how closely two nets train alike.
"""

from kquant.analysis.alignment import (
    AlignmentRecorder,
    alignment_error,
    fit_in_lockstep,
    quantized_layers,
    weight_agreement,
)
from kquant.analysis.equivalence import (
    Equivalence,
    NotEquivalentError,
    equivalence,
    htge_alpha,
    lr_factor,
    weight_map,
)
from kquant.analysis.twin import ScaledEstimator, ScaledSchedule, is_adaptive, scale_learning_rate, to_ste

__all__ = [
    "AlignmentRecorder",
    "Equivalence",
    "NotEquivalentError",
    "ScaledEstimator",
    "ScaledSchedule",
    "alignment_error",
    "equivalence",
    "fit_in_lockstep",
    "htge_alpha",
    "is_adaptive",
    "lr_factor",
    "quantized_layers",
    "scale_learning_rate",
    "to_ste",
    "weight_agreement",
    "weight_map",
]
