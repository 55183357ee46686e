"""Smoke test of integration/stopping.py: the stopping rules' steps and errors per layer.

A small CNN stands in for the zoo's library models (the script reads ``zoo.MODELS``), so
that the default suite runs it in seconds.
"""

from __future__ import annotations

import json

import stopping
import torch
import zoo
from torch import nn


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=4),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, groups=3),
        nn.Flatten(),
        nn.Linear(6 * 8 * 8, zoo.CLASSES),
    )


def test_every_rule_is_measured_against_the_optimum(tmp_path, monkeypatch):
    monkeypatch.setitem(zoo.MODELS, "small_cnn", (small_cnn, "image"))
    threads = torch.get_num_threads()
    try:
        result = stopping.main(["--models", "small_cnn", "--batch", "4", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)  # the script sets its own
    saved = json.loads((tmp_path / "stopping.json").read_text())
    assert saved["summary"] == result["summary"]
    assert {row["weight"] for row in saved["layers"]} == {"0.weight", "2.weight", "4.weight"}
    for row in saved["layers"]:
        assert set(row["rules"]) == {f"{stop}:{tol:g}" for stop, tol in stopping.RULES}
        for rule in row["rules"].values():
            assert rule["steps"] >= 1 and rule["solve_ms"] > 0
            assert rule["error"] >= row["optimum_error"] - 1e-9  # the optimum is the least
            assert rule["error"] - row["optimum_error"] < 1e-4
        assert row["kfac_error"] >= row["optimum_error"] - 1e-9
    assert "| small_cnn | objective:1e-05 |" in (tmp_path / "stopping.md").read_text()
