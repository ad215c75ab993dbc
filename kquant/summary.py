"""``kquant.summary(model)``: bits, parameter memory, compression and MACs per layer.

Memory counts what inference needs: each quantized weight at its bitwidth
plus the float scales beside it, every other parameter as float32.
Compression is float32 memory / that memory. MACs are per example, grouped by
precision ``input bits × weight bits``.
"""

from __future__ import annotations

import dataclasses
import math

from rich.console import Console
from rich.table import Table

from kquant.accounting import LayerStats


def _spatial(layer):
    try:
        return math.prod(d for d in layer.output.shape[1:-1] if d is not None)
    except (AttributeError, ValueError):
        return 1


def layer_stats(layer) -> LayerStats | None:
    """:class:`LayerStats` of a layer with weights (``None`` without weights)."""
    if hasattr(layer, "quantization_stats"):
        return layer.quantization_stats()
    if not layer.weights:
        return None
    kernel = getattr(layer, "kernel", None) if not hasattr(layer, "layers") else None
    n_kernel = math.prod(kernel.shape) if kernel is not None else 0
    total = sum(math.prod(v.shape) for v in layer.weights)
    return LayerStats(
        name=layer.name,
        kind=type(layer).__name__,
        kernel_params=n_kernel,
        kernel_bits=32.0,
        float_params=total - n_kernel,
        macs=n_kernel * _spatial(layer) if n_kernel else 0,
        notes="float",
    )


def _walk(model):
    for layer in model.layers:
        if hasattr(layer, "layers") and not hasattr(layer, "quantization_stats"):
            yield from _walk(layer)
        else:
            yield layer


@dataclasses.dataclass
class ModelSummary:
    name: str
    layers: list[LayerStats]

    @property
    def storage_bits(self) -> float:
        return sum(s.storage_bits for s in self.layers)

    @property
    def float32_bits(self) -> int:
        return sum(s.float32_bits for s in self.layers)

    @property
    def compression(self) -> float:
        return self.float32_bits / self.storage_bits if self.storage_bits else math.inf

    @property
    def macs_by_precision(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.layers:
            if s.macs:
                out[s.mac_precision] = out.get(s.mac_precision, 0) + s.macs
        return out

    @property
    def average_kernel_bits(self) -> float:
        n = sum(s.kernel_params for s in self.layers)
        return sum(s.kernel_params * s.kernel_bits for s in self.layers) / n if n else 0.0

    def table(self) -> Table:
        t = Table(title=f"kquant summary: {self.name}")
        for col in ("layer", "type", "weight bits", "input bits", "params", "memory (KiB)",
                    "compression", "MACs", "precision"):
            # fold, never ellipsize: a narrow terminal wraps cells instead of cutting numbers
            t.add_column(col, justify="left" if col in ("layer", "type", "precision") else "right",
                         overflow="fold")
        for s in self.layers:
            t.add_row(
                s.name, s.kind, f"{s.kernel_bits:g}" if s.kernel_params else "-",
                "32" if s.input_bits is None else f"{s.input_bits:g}",
                f"{s.kernel_params + s.float_params:,}", f"{s.storage_bits / 8192:.2f}",
                f"{s.compression:.1f}×", f"{s.macs:,}", s.mac_precision,
            )
        t.add_section()
        t.add_row(
            "total", "", f"{self.average_kernel_bits:.3g} avg", "",
            f"{sum(s.kernel_params + s.float_params for s in self.layers):,}",
            f"{self.storage_bits / 8192:.2f}", f"{self.compression:.1f}×",
            f"{sum(s.macs for s in self.layers):,}", "",
        )
        t.caption = "MACs by precision (input bits × weight bits): " + ", ".join(
            f"{k}: {v:,}" for k, v in self.macs_by_precision.items()
        )
        return t

    def to_dict(self) -> dict:
        """The summary as plain data (``kquant summary --json``, ``kquant fit --json``)."""
        return {
            "name": self.name,
            "layers": [{**dataclasses.asdict(s), "storage_bits": s.storage_bits,
                        "compression": s.compression, "mac_precision": s.mac_precision}
                       for s in self.layers],
            "total_params": sum(s.kernel_params + s.float_params for s in self.layers),
            "storage_bits": self.storage_bits,
            "float32_bits": self.float32_bits,
            "compression": self.compression,
            "average_kernel_bits": self.average_kernel_bits,
            "macs": sum(s.macs for s in self.layers),
            "macs_by_precision": self.macs_by_precision,
        }

    def __str__(self):
        console = Console(record=True, width=80, file=_NullFile())
        print_whole(self.table(), console)  # as wide as the table: nothing cut
        return console.export_text()


class _NullFile:
    def write(self, _):
        return 0

    def flush(self):
        pass


def summary(model, print_summary=True, console=None) -> ModelSummary:
    """Summarise a built model; prints a table unless ``print_summary=False``."""
    if not model.built:
        raise ValueError("kquant.summary needs a built model (call it on data or give it an Input).")
    stats = [s for s in (layer_stats(layer) for layer in _walk(model)) if s is not None]
    result = ModelSummary(model.name, stats)
    if print_summary:
        console = console or Console()
        print_whole(result.table(), console)
        from kquant import alq  # ALQ layers add the paper's Eq. 26 storage table

        rows = alq.storage_table(model)
        if rows and len(rows) > 1:
            print_whole(alq.format_table(rows), console)
    return result


def print_whole(renderable, console=None):
    """Print a table without cutting anything.

    On a terminal, table cells fold (wrap) to the terminal's width; when the
    output is a file or a pipe (no width), the console width is raised to the
    table's natural width, so every number and header appears whole.
    """
    console = console or Console()
    for column in getattr(renderable, "columns", ()):
        if column.overflow == "ellipsis":
            column.overflow = "fold"
    if console.is_terminal:
        console.print(renderable)
        return
    from rich.measure import Measurement

    natural = Measurement.get(console, console.options.update_width(100_000), renderable).maximum
    saved = console._width  # rich's print(width=) cannot exceed the console's width
    console.width = max(console.width, natural)
    try:
        console.print(renderable, crop=False)
    finally:
        console._width = saved
