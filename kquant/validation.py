"""Hyper-parameter checks shared by estimators and quantizers.

Every numeric hyper-parameter is checked in ``__init__``: a real, finite number
in its range (booleans are not numbers here), and every flag a real ``bool``.
Errors name the argument::

    ValueError: `t` must be a finite number > 0, got inf.
"""

from __future__ import annotations

import math
import numbers

import numpy as np


def _describe(gt, ge, lt, le) -> str:
    if (gt is not None or ge is not None) and (lt is not None or le is not None):
        left = f"({gt}" if gt is not None else f"[{ge}"
        right = f"{lt})" if lt is not None else f"{le}]"
        return f" in {left}, {right}"
    if gt is not None:
        return f" > {gt}"
    if ge is not None:
        return f" >= {ge}"
    if lt is not None:
        return f" < {lt}"
    if le is not None:
        return f" <= {le}"
    return ""


def check_number(value, argument: str, *, gt=None, ge=None, lt=None, le=None) -> float:
    """``value`` as a float, or ``ValueError`` naming ``argument``.

    It must be a real, finite number (not a bool) with ``value > gt``,
    ``value >= ge``, ``value < lt``, ``value <= le`` for the bounds given.
    """
    message = f"`{argument}` must be a finite number{_describe(gt, ge, lt, le)}, got {value!r}."
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        if not (isinstance(value, np.ndarray) and value.shape == () and value.dtype.kind in "iuf"):
            raise ValueError(message)
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(message)
    if ((gt is not None and not number > gt) or (ge is not None and not number >= ge)
            or (lt is not None and not number < lt) or (le is not None and not number <= le)):
        raise ValueError(message)
    return number


def check_bool(value, argument: str) -> bool:
    """``value`` if it is a ``bool`` (NumPy's too), else ``ValueError`` naming ``argument``."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"`{argument}` must be a bool (True or False), got {value!r}.")
    return bool(value)


def check_choice(value, argument: str, choices) -> str:
    """``value`` if it is one of ``choices``, else ``ValueError`` naming ``argument``."""
    if not isinstance(value, str) or value not in choices:
        options = ", ".join(map(repr, choices))
        raise ValueError(f"`{argument}` must be one of {options}, got {value!r}.")
    return value


def check_jit_compile(value, argument: str = "jit_compile"):
    """``value`` if Keras' ``compile`` takes it as ``jit_compile`` (``"auto"``, ``True``,
    ``False``; not ``1``), else ``ValueError`` naming ``argument``."""
    if not (value == "auto" if isinstance(value, str) else isinstance(value, (bool, np.bool_))):
        raise ValueError(f"`{argument}` must be 'auto', True or False, got {value!r}.")
    return value if isinstance(value, str) else bool(value)


__all__ = ["check_bool", "check_choice", "check_jit_compile", "check_number"]
