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


def test_every_rule_is_measured_against_the_optimum(tmp_path, monkeypatch, keeps_threads):
    monkeypatch.setitem(zoo.MODELS, "small_cnn", (small_cnn, "image"))
    result = stopping.main(["--models", "small_cnn", "--batch", "4", "--out", str(tmp_path)])
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


def test_grouped_layers_are_measured_three_ways(tmp_path, monkeypatch, keeps_threads):
    import grouped

    monkeypatch.setitem(zoo.MODELS, "small_cnn", (small_cnn, "image"))
    grouped.main(
        ["--models", "small_cnn", "--batch", "4", "--image-size", "20", "--out", str(tmp_path)]
    )
    (row,) = json.loads((tmp_path / "grouped.json").read_text())["layers"]
    assert row["weight"] == "2.weight" and row["sizes"][-1] == 3
    assert row["sizes"][2] == 25  # 20-pixel images: 5 × 5 positions after the stride-4 stem
    for key in ("coupled_error", "per_group_error", "kfac_error"):
        assert 0 <= row[key] <= 1.5


@pytest.mark.parametrize("rows_per_group", [1, 2])
def test_the_per_group_error_is_the_dense_one(rows_per_group):
    """``‖F − blockdiag_g(L_g ⊗ R_g)‖ / ‖F‖`` against ``F`` and the block formed densely."""
    import grouped

    from kfoc_backpack.collect import GroupedLayerTerms
    from kfoc_backpack.solver import LayerSizes, SolverOptions
    from kfoc_backpack.solver.grouped import GroupedTerms

    groups, cols = 3, 4
    gen = torch.Generator().manual_seed(0)
    samples = torch.randn(7, groups * rows_per_group, cols, generator=gen, dtype=torch.float64)
    terms = GroupedLayerTerms(
        GroupedTerms(samples.unflatten(1, (groups, rows_per_group))),
        torch.ones(groups, dtype=torch.float64),
        None,
        LayerSizes(1, 7, 1, groups * rows_per_group, cols, groups),
    )
    block = terms.kfoc_block(SolverOptions(tol=1e-12, max_iter=500))
    dense = sum_of_outer(samples)
    expected = float((dense - block.dense()).norm() / dense.norm())
    assert grouped.per_group_error(terms, block) == pytest.approx(expected, rel=1e-8)
    split = samples.reshape(7, groups, rows_per_group * cols)
    for group in range(groups):  # each group's product is its block's optimum
        own = sum_of_outer(split[:, group].reshape(7, rows_per_group, cols))
        left, right = block.left[group], block.right[group]
        error = float((own - torch.kron(left, right)).norm() / own.norm())
        best = optimal_relative_error(own, rows_per_group, cols) if rows_per_group > 1 else 0
        assert error == pytest.approx(best, abs=1e-8)
