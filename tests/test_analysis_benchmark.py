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
    assert set(rows) == set(ste_equivalence.PAPER)
    for row in rows.values():
        for key in ste_equivalence.COLUMNS[2:]:
            assert math.isfinite(row[key]), (row["experiment"], key)
        assert 0 <= row["E_bar_%"] < 100 and 0 <= row["agreement_%"] <= 100
        for key in ("train_acc_a", "train_acc_b", "val_acc_a", "val_acc_b"):
            assert 0 <= row[key] <= 1
    # The twin tracks the Q̂ net more closely than the STE net without M and α.
    assert rows["baseline (S)"]["E_bar_%"] < rows["unadjusted (S)"]["E_bar_%"]
    meta = data["meta"]
    assert abs(meta["alpha"] - ste_equivalence.HTGE_T**2
               / (ste_equivalence.HTGE_T + math.sinh(ste_equivalence.HTGE_T))) < 1e-5
    assert "| baseline (S) |" in (folder / "results.md").read_text()
