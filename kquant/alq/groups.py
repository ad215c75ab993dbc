"""Group structures of ALQ: how a kernel is sliced into groups of ``n`` weights.

Every Keras kernel is ``(*spatial, fan_in_channels, out_channels)`` (a Dense
kernel is a 1×1 convolution). Per output channel ``c`` (ALQ paper App. A.2):

* ``"pixel"``: ``kernel[h, w, :, c]`` (all input channels of one pixel), n = c_in;
  for a Dense layer this is the whole column, as for ``"channel"``.
* ``"kernel"``: ``kernel[:, :, d, c]`` (one 2-D kernel), n = kh·kw.
* ``"channel"``: ``kernel[..., c]``, n = kh·kw·c_in.
* ``"subchannel(k)"`` or the int ``k``: consecutive chunks of ``k`` weights of
  the channel (in ``(h, w, c_in)`` order), n = k.
"""

from __future__ import annotations

import math
import re

import numpy as np
from keras import ops

STRUCTURES = ("pixel", "kernel", "channel", "subchannel(k)", "int k")
_SUB = re.compile(r"^\s*sub-?channel\s*\(\s*(\d+)\s*\)\s*$")


def parse(group) -> tuple[str, int | None]:
    """``("pixel"|"kernel"|"channel"|"subchannel", k)``; clear error naming ``group``."""
    if isinstance(group, bool):
        raise ValueError(f"`group` must be one of {STRUCTURES}, got {group!r}.")
    if isinstance(group, (int, np.integer)):
        if group < 1:
            raise ValueError(f"`group` size must be a positive integer, got {group}.")
        return "subchannel", int(group)
    if isinstance(group, str):
        name = group.strip().lower()
        if name in ("pixel", "kernel", "channel"):
            return name, None
        match = _SUB.match(name)
        if match and int(match.group(1)) >= 1:
            return "subchannel", int(match.group(1))
    raise ValueError(f"Unknown `group` structure {group!r}; use one of {STRUCTURES}.")


def canonical(group) -> str | int:
    """The serializable spelling of a group structure."""
    kind, k = parse(group)
    return f"subchannel({k})" if kind == "subchannel" else kind


class GroupLayout:
    """Kernel ⇄ groups ``[G, n]`` for one kernel shape and group structure."""

    def __init__(self, kernel_shape, group, layer_name="layer"):
        self.kernel_shape = tuple(int(d) for d in kernel_shape)
        if len(self.kernel_shape) < 2:
            raise ValueError(f"Kernel of {layer_name} must have rank >= 2, got {self.kernel_shape}.")
        self.kind, k = parse(group)
        *spatial, c_in, c_out = self.kernel_shape
        fan_in = int(np.prod(spatial, dtype=int)) * c_in
        rank = len(self.kernel_shape)
        if self.kind == "kernel":
            # [c_out, c_in, *spatial]: contiguous runs of one 2-D kernel.
            self.perm = (rank - 1, rank - 2, *range(rank - 2))
            n = int(np.prod(spatial, dtype=int))
        else:
            # [c_out, *spatial, c_in]: contiguous runs of one pixel's input channels.
            self.perm = (rank - 1, *range(rank - 1))
            n = {"pixel": c_in, "channel": fan_in}.get(self.kind, k)
        if n < 1 or fan_in % n:
            raise ValueError(
                f"`group` {group!r}: group size {n} does not divide the fan-in {fan_in} "
                f"of {layer_name} (kernel shape {self.kernel_shape})."
            )
        self.group_size = n
        self.num_groups = c_out * fan_in // n
        self.inverse_perm = tuple(int(i) for i in np.argsort(self.perm))
        self.permuted_shape = tuple(self.kernel_shape[i] for i in self.perm)

    @property
    def num_weights(self) -> int:
        return self.num_groups * self.group_size

    def to_groups(self, kernel):
        """Kernel-shaped tensor → ``[G, n]``."""
        return ops.reshape(ops.transpose(kernel, self.perm), (self.num_groups, self.group_size))

    def from_groups(self, grouped):
        """``[G, n]`` → kernel-shaped tensor."""
        return ops.transpose(ops.reshape(grouped, self.permuted_shape), self.inverse_perm)

    def to_groups_numpy(self, kernel):
        return np.transpose(np.asarray(kernel), self.perm).reshape(self.num_groups, self.group_size)

    def from_groups_numpy(self, grouped):
        return np.transpose(np.asarray(grouped).reshape(self.permuted_shape), self.inverse_perm)


def lut_bits_per_group(max_bits: int) -> int:
    """Bits of one entry of the per-group bitwidth look-up table (values 0..I_max)."""
    return max(1, math.ceil(math.log2(max_bits + 1)))
