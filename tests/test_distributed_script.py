"""Smoke test of integration/distributed.py in one process (a world of one).

The multi-process agreement itself is tested in ``test_distributed.py``; here the
script's own path without ``torchrun``: every aggregation fits, the one-process and the
"all ranks" fit (the same single process) agree, nothing is communicated, and the JSON
it writes holds the rows it printed.
"""

from __future__ import annotations

import json

import distributed


def test_quick_run_in_one_process(tmp_path, keeps_threads):
    out = tmp_path / "distributed.json"
    result = distributed.main(["--quick", "--out", str(out)])
    assert result["world"] == 1 and result["samples"] == 500
    rows = {row["aggregation"]: row for row in result["rows"]}
    assert set(rows) == set(distributed.AGGREGATIONS)
    for row in rows.values():
        assert row["max_relative_difference"] <= 1e-6
        assert row["n_data"] == [500, 500]
        assert row["collectives"] == 0 and row["bytes"] == 0
        assert row["seconds_1"] > 0
    for name in ("approx", "running"):  # measured against the one-process optimum
        gap = rows[name]["max_difference_to_optimal"]
        assert set(gap) == {"1"} and 0 < gap["1"] < 1
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
