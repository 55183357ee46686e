"""Smoke test of ``integration/convergence.py`` (it measures; no timing is asserted)."""

import re

from convergence import layer_report, timing_report, warm_start_report


def test_convergence_report_runs(capsys):
    layer_report(8)
    warm_start_report("lenet5", 4, batches=2)
    timing_report(sizes=(8,), repeats=1)
    lines = capsys.readouterr().out.splitlines()
    layers = [line for line in lines if "ratio" in line]
    assert len(layers) == 3 and all("default:" in line and "optimum" in line for line in layers)
    assert all("converged True" in line.split("default:")[1] for line in layers)
    warm = [line for line in lines if line.startswith("lenet5")]
    assert len(warm) == 10 and all(re.search(r"\d+→\d+$", line) for line in warm)
    assert any(line.startswith("K=   8") for line in lines)
