"""Bit packing of integer codes: ``ceil(n·bits/8)`` bytes, LSB-first bit planes per value."""

from __future__ import annotations

import math

import numpy as np


def packed_size(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits occupy."""
    return -(-int(count) * int(bits) // 8)


def pack_codes(codes, bits):
    """Pack integers in ``[0, 2^bits)`` into ``ceil(codes.size·bits/8)`` bytes (uint8)."""
    flat = np.asarray(codes, dtype=np.int64).ravel()
    if flat.size and (flat.min() < 0 or flat.max() >= 2**bits):
        raise ValueError(f"codes must be in [0, {2**bits}) for bits={bits}.")
    planes = (flat[:, None] >> np.arange(bits)) & 1
    return np.packbits(planes.astype(np.uint8).ravel())


def unpack_codes(packed, bits, shape):
    """Inverse of :func:`pack_codes` (``int64`` codes of ``shape``)."""
    n = math.prod(shape)
    planes = np.unpackbits(np.asarray(packed, np.uint8), count=n * bits).reshape(n, bits)
    return (planes.astype(np.int64) << np.arange(bits)).sum(axis=1).reshape(shape)


def padding_is_zero(packed, count, bits) -> bool:
    """Whether the bits after the last code (the last byte's tail) are all zero."""
    used = int(count) * int(bits)
    bits_all = np.unpackbits(np.asarray(packed, np.uint8))
    return not bits_all[used:].any()
