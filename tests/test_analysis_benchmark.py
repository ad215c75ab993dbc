"""The ste_equivalence benchmark runs end to end at the tiny scale and writes sane results."""

import json
import math

from kquant.benchmarks import ste_equivalence
from kquant.benchmarks.common import BenchConfig, write_result


def test_ste_equivalence_tiny(tmp_path):
    cfg = BenchConfig(tiny=True, out_dir=str(tmp_path))
    result = ste_equivalence.run(cfg)
    folder = write_result(result, cfg, command="pytest tiny")
    for name in ("results.json", "results.md", "plot.png"):
        assert (folder / name).stat().st_size > 0
    data = json.loads((folder / "results.json").read_text())
    rows = {r["experiment"]: r for r in data["rows"]}
    assert set(rows) == set(ste_equivalence.PAPER) | set(ste_equivalence.EXTRA_ROWS)
    for row in rows.values():
        for key in ste_equivalence.COLUMNS[2:]:
            if key.startswith("paper_") and row["experiment"] not in ste_equivalence.PAPER:
                assert key not in row   # no paper number is invented for our extra rows
                continue
            assert math.isfinite(row[key]), (row["experiment"], key)
        assert 0 <= row["E_bar_%"] < 100 and 0 <= row["agreement_%"] <= 100
        for key in ("train_acc_a", "train_acc_b", "val_acc_a", "val_acc_b"):
            assert 0 <= row[key] <= 1
    # The twin tracks the Q̂ net more closely than the STE net without M and α.
    assert rows["baseline (S)"]["E_bar_%"] < rows["unadjusted (S)"]["E_bar_%"]
    meta = data["meta"]
    # Each row trained the optimizer its label names (read back after training).
    trained = meta["trained_optimizers"]
    for label in ("baseline (S)", "lr-tweak (S)", "unadjusted (S)"):
        assert trained[label]["a"]["momentum"] == trained[label]["b"]["momentum"] == 0.9, label
    for label in ste_equivalence.EXTRA_ROWS:
        assert trained[label]["a"]["momentum"] == trained[label]["b"]["momentum"] == 0.0, label
    for label in ("baseline (A)", "lr-tweak (A)"):
        assert trained[label]["a"]["beta_2"] == trained[label]["b"]["beta_2"] == 0.95, label
    assert abs(meta["alpha"] - ste_equivalence.HTGE_T**2
               / (ste_equivalence.HTGE_T + math.sinh(ste_equivalence.HTGE_T))) < 1e-5
    assert "| baseline (S) |" in (folder / "results.md").read_text()
