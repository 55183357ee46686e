"""Smoke test of ``integration/correction_cost.py`` (timings are not asserted)."""

from __future__ import annotations

import json
import math

import correction_cost


def test_correction_cost_smoke(tmp_path):
    result = correction_cost.main(
        ["--models", "lenet5", "--repeats", "1", "--batches", "1", "--out", str(tmp_path)]
    )
    (record,) = result["models"]
    assert record["errors"] == {}
    for key in ("correction/kron", "correction/backpack-kflr", "fit-ekfoc/kron", "fit-ekfac/kron"):
        assert math.isfinite(record[key]) and record[key] > 0
    assert json.loads((tmp_path / "correction_cost.json").read_text()) == result
    assert "| lenet5 | 1 × 32 |" in (tmp_path / "correction_cost.md").read_text()
