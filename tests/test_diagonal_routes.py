"""Smoke test of ``integration/diagonal_routes.py`` (timings are not asserted)."""

from __future__ import annotations

import json
import math

import diagonal_routes


def test_diagonal_routes_smoke(tmp_path):
    result = diagonal_routes.main(
        ["--layers", "conv512", "--samples", "1", "--columns", "2", "--repeats", "1"]
        + ["--out", str(tmp_path)]
    )
    (record,) = result["layers"]
    assert record["chosen"] in ("formed", "pairs")
    assert all(math.isfinite(record[f"{r}_s"]) for r in ("formed", "pairs"))
    assert json.loads((tmp_path / "diagonal_routes.json").read_text()) == result
    assert "| conv512 | 2·1·16·512·4608 |" in (tmp_path / "diagonal_routes.md").read_text()
