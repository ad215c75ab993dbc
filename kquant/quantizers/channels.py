"""Which axes of a tensor are its channels, for per-channel quantizers.

A per-channel quantizer keeps one scale (or step) per channel and reduces
over every other axis. ``channel_axes`` names the channel axes of the tensor
it quantizes; ``None`` means the last axis (the Dense/Conv kernel layout).
Quantized layers set it at build time from their kernel layout and
``data_format`` (e.g. a depthwise kernel ``(kh, kw, in, multiplier)`` has
channel axes ``(2, 3)``, a transposed convolution's ``(kh, kw, out, in)``
has ``(2,)``, a ``channels_first`` input has ``(1,)``).
"""

from __future__ import annotations

import math

import numpy as np


def check_channel_axes(channel_axes, argument="channel_axes"):
    """``None``, or a sorted tuple of distinct ints; the error names the argument."""
    if channel_axes is None:
        return None
    if isinstance(channel_axes, (int, np.integer)) and not isinstance(channel_axes, bool):
        channel_axes = (channel_axes,)
    if (not isinstance(channel_axes, (list, tuple)) or not channel_axes
            or any(isinstance(a, bool) or not isinstance(a, (int, np.integer))
                   for a in channel_axes)):
        raise ValueError(
            f"`{argument}` must be None, an int or a non-empty list of ints, got {channel_axes!r}."
        )
    axes = tuple(int(a) for a in channel_axes)
    if len(set(axes)) != len(axes):
        raise ValueError(f"`{argument}` has repeated axes: {channel_axes!r}.")
    return axes


def resolve(rank, channel_axes):
    """The channel axes as sorted non-negative ints for a tensor of ``rank``."""
    axes = (-1,) if channel_axes is None else channel_axes
    resolved = []
    for a in axes:
        if not -rank <= a < rank:
            raise ValueError(
                f"`channel_axes` {tuple(axes)} is out of range for a tensor of rank {rank}."
            )
        resolved.append(a % rank)
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"`channel_axes` {tuple(axes)} names one axis twice for rank {rank}.")
    return tuple(sorted(resolved))


def reduced_axes(rank, channel_axes):
    """The axes a per-channel statistic averages over (all but the channel axes)."""
    keep = resolve(rank, channel_axes)
    return tuple(a for a in range(rank) if a not in keep)


def channel_shape(shape, channel_axes):
    """Shape of one value per channel, e.g. ``(in, multiplier)`` for a depthwise kernel."""
    return tuple(int(shape[a]) for a in resolve(len(shape), channel_axes))


def broadcast_shape(shape, channel_axes):
    """``channel_shape`` with size-1 axes inserted so it broadcasts against ``shape``."""
    keep = resolve(len(shape), channel_axes)
    return tuple(int(shape[a]) if a in keep else 1 for a in range(len(shape)))


def channel_count(shape, channel_axes):
    """How many channels (scales) a per-channel quantizer stores for ``shape``."""
    return math.prod(channel_shape(shape, channel_axes))
