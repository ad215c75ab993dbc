"""Storage of ALQ layers (paper Eq. 26) and the bitwidth plot (paper Fig. 2).

Per layer with ``N`` weights in groups of ``n`` and average bitwidth ``I``:
bases ``I·N`` bits, coordinates ``32·I·N/n`` bits (one float per active basis),
so ``r_s = 32N / (I·N + 32·I·N/n)`` (Eq. 26); we add the per-group bitwidth
look-up table, ``G·⌈log2(I_max+1)⌉`` bits, which the paper counts too (§5.2).
"""

from __future__ import annotations

from kquant.alq.groups import lut_bits_per_group
from kquant.alq.layers import alq_layers


def layer_row(layer) -> dict:
    """Storage row of one ALQ layer."""
    bits = layer.group_bitwidths()
    n, g = layer.layout.group_size, layer.layout.num_groups
    weights = layer.layout.num_weights
    average = float(bits.mean())
    eq26_bits = average * weights + 32 * average * weights / n
    lut = g * lut_bits_per_group(layer.max_bits)
    total = eq26_bits + lut
    return {
        "layer": layer.name,
        "weights": weights,
        "group_size": n,
        "groups": g,
        "average_bits": average,
        "groups_removed": int((bits == 0).sum()),
        "eq26_bits": eq26_bits,
        "lut_bits": lut,
        "storage_kb": total / 8 / 1000,
        "compression": 32 * weights / total if total else float("inf"),
    }


def storage_table(model) -> list[dict]:
    """One row per ALQ layer plus a ``"total"`` row (weights only, as in the paper)."""
    rows = [layer_row(layer) for layer in alq_layers(model)]
    if rows:
        weights = sum(r["weights"] for r in rows)
        total_bits = sum(r["eq26_bits"] + r["lut_bits"] for r in rows)
        rows.append({
            "layer": "total",
            "weights": weights,
            "group_size": "",
            "groups": sum(r["groups"] for r in rows),
            "average_bits": sum(r["average_bits"] * r["weights"] for r in rows) / weights,
            "groups_removed": sum(r["groups_removed"] for r in rows),
            "eq26_bits": sum(r["eq26_bits"] for r in rows),
            "lut_bits": sum(r["lut_bits"] for r in rows),
            "storage_kb": total_bits / 8 / 1000,
            "compression": 32 * weights / total_bits if total_bits else float("inf"),
        })
    return rows


def format_table(rows) -> str:
    """The storage table as aligned text (for ``kquant.summary`` to append)."""
    if not rows:
        return "(no ALQ layer)"
    header = f"{'layer':<22}{'weights':>10}{'n':>6}{'avg bits':>10}{'removed':>9}" \
             f"{'KB':>10}{'compr.':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['layer'][:21]:<22}{r['weights']:>10}{str(r['group_size']):>6}"
                     f"{r['average_bits']:>10.3f}{r['groups_removed']:>9}"
                     f"{r['storage_kb']:>10.2f}{r['compression']:>8.1f}×")
    return "\n".join(lines)


def plot_bitwidths(model_or_rows, path, title="ALQ: average bitwidth per layer"):
    """Bars: weights per layer (log scale); line: average bitwidth (paper Fig. 2). Writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = model_or_rows if isinstance(model_or_rows, list) else storage_table(model_or_rows)
    rows = [r for r in rows if r["layer"] != "total"]
    names = [r["layer"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.0 + 0.8 * len(rows)), 3.5))
    ax.bar(range(len(rows)), [r["weights"] for r in rows], color="#9ecae1", label="weights")
    ax.set_yscale("log")
    ax.set_ylabel("# weights")
    ax.set_xticks(range(len(rows)), names, rotation=45, ha="right")
    twin = ax.twinx()
    twin.plot(range(len(rows)), [r["average_bits"] for r in rows], "o-", color="#d62728",
              label="average bitwidth")
    twin.set_ylabel("average bitwidth")
    twin.set_ylim(bottom=0)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
