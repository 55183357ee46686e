"""Smoke test of integration/laplace_speed.py (the Laplace.fit timing script)."""

from __future__ import annotations

import json

import laplace_speed


def test_quick_run_writes_table_and_flops(tmp_path):
    result = laplace_speed.main(["--quick", "--models", "lenet5", "--out", str(tmp_path)])
    (record,) = result["fits"]
    assert record["model"] == "lenet5"
    for method in laplace_speed.METHODS:
        assert isinstance(record[method], float) and record[method] > 0
    rows = result["flops"]["lenet5"]
    assert {row["kind"] for row in rows} == {"Conv2d", "Linear"}
    assert all(row["kfoc_flops"] > 0 and row["kfac_flops"] > 0 for row in rows)
    saved = json.loads((tmp_path / "laplace_speed.json").read_text())
    assert saved["fits"][0]["model"] == "lenet5"
    assert "| lenet5 |" in (tmp_path / "laplace_speed.md").read_text()
