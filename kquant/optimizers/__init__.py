"""kquant optimizers: :class:`ALQ` (loss-aware multi-bit quantization) and
:class:`SkipNonFinite` (skip steps with NaN/inf gradients)."""

from kquant.alq.optimizer import ALQ, PHASES
from kquant.optimizers.skip_non_finite import SkipNonFinite

__all__ = ["ALQ", "PHASES", "SkipNonFinite"]
