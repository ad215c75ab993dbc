"""Per-layer storage and compute accounting shared by ``kquant.summary``.

Any layer may describe itself by a ``quantization_stats()`` method returning
:class:`LayerStats` (kquant's quantized layers and ALQ layers do); other
layers with weights count as float32.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass
class LayerStats:
    """Storage and compute of one layer.

    ``kernel_bits`` is the average bits per quantized weight (ALQ: fractional);
    ``extra_bits`` counts per-group scales, coordinates and look-up tables;
    ``input_bits`` is ``None`` for float inputs; ``macs`` per example.
    """

    name: str
    kind: str
    kernel_params: int = 0
    kernel_bits: float = 32.0
    float_params: int = 0
    extra_bits: int = 0
    input_bits: float | None = None
    macs: int = 0
    notes: str = ""

    @property
    def storage_bits(self) -> float:
        return self.kernel_params * self.kernel_bits + 32 * self.float_params + self.extra_bits

    @property
    def float32_bits(self) -> int:
        return 32 * (self.kernel_params + self.float_params)

    @property
    def compression(self) -> float:
        return self.float32_bits / self.storage_bits if self.storage_bits else math.inf

    @property
    def mac_precision(self) -> str:
        """Like ``"1×1"`` (input bits × weight bits), ``"32×2"``, or ``"float"``."""
        if self.macs == 0:
            return "-"
        a = "32" if self.input_bits is None else f"{self.input_bits:g}"
        w = f"{self.kernel_bits:g}"
        return "float" if a == "32" and w == "32" else f"{a}×{w}"
