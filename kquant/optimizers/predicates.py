"""Named variable predicates for :class:`~kquant.optimizers.RoutingOptimizer`.

A route written as a name (``"binary_kernels"``) serializes with the
optimizer; kquant's quantized layers mark the latent kernel of a binary
kernel quantizer (1 bit, levels ±1: ``sign``, ``bwn``) when they build, and
:func:`mark_binary` marks any other variable by hand.
"""

from __future__ import annotations

BINARY_ATTRIBUTE = "_kquant_binary"


def mark_binary(variable, binary: bool = True):
    """Mark ``variable`` as a binary (±1) weight, the kind Bop trains; returns it."""
    setattr(variable, BINARY_ATTRIBUTE, bool(binary))
    return variable


def is_binary_variable(variable) -> bool:
    """``True`` for a variable marked binary (see :func:`mark_binary`)."""
    return bool(getattr(variable, BINARY_ATTRIBUTE, False))


def is_binary_quantizer(quantizer) -> bool:
    """A 1-bit quantizer whose levels are ±1 (times a scale): ``sign``, ``bwn``."""
    try:
        return quantizer.precision == 1 and bool(quantizer.staircase.binary)
    except (AttributeError, NotImplementedError):
        return False


#: name -> predicate(variable) -> bool
PREDICATES = {
    "binary_kernels": is_binary_variable,
    "all": lambda variable: True,
}
