"""ALQ arrays on disk next to ALQ Eq. 26 storage (Qu et al. 2020).

Eq. 26 counts, per layer of ``N`` weights in groups of ``n`` at average bitwidth
``I``: bases ``I·N`` bits + coordinates ``32·I·N/n`` bits, plus a per-group
bitwidth table of ``G·⌈log2(I_max+1)⌉`` bits. The native file stores exactly the
active bases (1 bit each) and their coordinates (float32), and the mask
(``G·I_max`` bits: which slots are active, since pruning frees any slot) in
place of the bitwidth table.
"""

from __future__ import annotations

import os

from kquant.alq.layers import alq_layers
from kquant.alq.storage import layer_row
from kquant.deploy.native import build_export


def alq_storage_report(model, path):
    """Export ``model`` to ``path`` and compare its ALQ arrays with Eq. 26, per layer."""
    exp = build_export(model)
    exp.write(path)
    by_name = {e["layer"]: e for e in exp.entries if e["kind"] == "alq"}
    rows = []
    for layer in alq_layers(model):
        e = by_name[layer.name]
        eq26 = layer_row(layer)
        sizes = {part: int(exp.arrays[f"{e['path']}:{part}"].nbytes)
                 for part in ("bases", "coordinates", "mask")}
        rows.append({"layer": layer.name, "eq26_bits": eq26["eq26_bits"],
                     "lut_bits": eq26["lut_bits"], "bases_bytes": sizes["bases"],
                     "coordinates_bytes": sizes["coordinates"], "mask_bytes": sizes["mask"],
                     "eq26_bytes": (eq26["eq26_bits"] + eq26["lut_bits"]) / 8,
                     "stored_bytes": sum(sizes.values())})
    eq26 = sum(r["eq26_bytes"] for r in rows)
    stored = sum(r["stored_bytes"] for r in rows)
    total = {"eq26_bytes": eq26, "stored_bytes": stored,
             "ratio": stored / eq26 if eq26 else float("nan"),
             "file_bytes": os.path.getsize(path)}
    return {"layers": rows, "total": total}


def format_alq_storage(report) -> str:
    """The report as an aligned text table."""
    header = f"{'layer':<20}{'Eq. 26 + LUT B':>16}{'stored B':>10}{'bases':>8}{'α':>8}{'mask':>7}"
    lines = [header, "-" * len(header)]
    for r in report["layers"]:
        lines.append(f"{r['layer'][:19]:<20}{r['eq26_bytes']:>16.0f}{r['stored_bytes']:>10}"
                     f"{r['bases_bytes']:>8}{r['coordinates_bytes']:>8}{r['mask_bytes']:>7}")
    t = report["total"]
    lines.append(f"{'total':<20}{t['eq26_bytes']:>16.0f}{t['stored_bytes']:>10}  "
                 f"(stored/Eq. 26 = {t['ratio']:.3f}; whole file {t['file_bytes']} B)")
    return "\n".join(lines)
