"""kquant optimizers: :class:`ALQ` (loss-aware multi-bit quantization)."""

from kquant.alq.optimizer import ALQ, PHASES

__all__ = ["ALQ", "PHASES"]
