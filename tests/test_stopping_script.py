"""Smoke test of integration/stopping.py: the stopping rules' steps and errors per layer.

A small CNN stands in for the zoo's library models (the script reads ``zoo.MODELS``), so
that the default suite runs it in seconds.
"""

from __future__ import annotations

import json

import pytest
import stopping
import torch
import zoo
from ground_truth import optimal_relative_error, sum_of_outer
from torch import nn


def small_cnn(image_size: int = 32) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=4),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, groups=3),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(6 * 2 * 2, zoo.CLASSES),
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
    assert {row["weight"] for row in saved["layers"]} == {"0.weight", "2.weight", "5.weight"}
    for row in saved["layers"]:
        assert set(row["rules"]) == {f"{stop}:{tol:g}" for stop, tol in stopping.RULES}
        for rule in row["rules"].values():
            assert rule["steps"] >= 1 and rule["solve_ms"] > 0
            assert rule["error"] >= row["optimum_error"] - 1e-9  # the optimum is the least
            assert rule["error"] - row["optimum_error"] < 1e-4
        assert row["kfac_error"] >= row["optimum_error"] - 1e-9
    assert "| small_cnn | objective:1e-05 |" in (tmp_path / "stopping.md").read_text()


def test_grouped_layers_are_measured_three_ways(tmp_path, monkeypatch):
    import grouped

    monkeypatch.setitem(zoo.MODELS, "small_cnn", (small_cnn, "image"))
    threads = torch.get_num_threads()
    try:
        grouped.main(
            ["--models", "small_cnn", "--batch", "4", "--image-size", "20", "--out", str(tmp_path)]
        )
    finally:
        torch.set_num_threads(threads)
    (row,) = json.loads((tmp_path / "grouped.json").read_text())["layers"]
    assert row["weight"] == "2.weight" and row["sizes"][-1] == 3
    assert row["sizes"][2] == 25  # 20-pixel images: 5 × 5 positions after the stride-4 stem
    for key in ("coupled_error", "per_group_error", "kfac_error"):
        assert 0 <= row[key] <= 1.5


@pytest.mark.parametrize("rows_per_group", [1, 2])
def test_the_per_group_optimum_is_the_dense_one(rows_per_group):
    import grouped

    from kfoc_backpack.solver import SolverOptions

    groups, cols = 3, 4
    gen = torch.Generator().manual_seed(0)
    samples = torch.randn(7, groups * rows_per_group, cols, generator=gen, dtype=torch.float64)
    norms, captured = grouped.per_group(samples, groups, SolverOptions(tol=1e-12, max_iter=500))
    split = samples.reshape(7, groups, rows_per_group * cols)
    expected_norms, expected_captured = 0.0, 0.0
    for group in range(groups):
        block = sum_of_outer(split[:, group].reshape(7, rows_per_group, cols))
        norm_sq = float(block.square().sum())
        error = optimal_relative_error(block, rows_per_group, cols) if rows_per_group > 1 else 0
        expected_norms += norm_sq
        expected_captured += norm_sq * (1 - error**2)
    assert norms == pytest.approx(expected_norms, rel=1e-10)
    assert captured == pytest.approx(expected_captured, rel=1e-8)
