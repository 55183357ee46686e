"""Smoke test of integration/precision.py (float32 against float64 factors per layer)."""

from __future__ import annotations

import json

import precision


def test_lenet5_float32_factors_agree_with_float64(tmp_path):
    out = tmp_path / "precision.json"
    rows = precision.main(["--models", "lenet5", "--batch-size", "4", "--out", str(out)])
    assert {(r["method"], r["layer"]) for r in rows} == {
        (method, layer)
        for method in precision.METHODS
        for layer in ("0.weight", "3.weight", "7.weight", "9.weight", "11.weight")
    }
    assert all(0 <= r["diff"] < 1e-4 for r in rows)  # tol 1e-6 in float32
    assert json.loads(out.read_text()) == rows


def test_product_difference_matches_dense_kronecker():
    import torch

    gen = torch.Generator().manual_seed(0)
    a = [torch.randn(3, 3, generator=gen, dtype=torch.float64) for _ in range(2)]
    b = [torch.randn(3, 3, generator=gen, dtype=torch.float64) for _ in range(2)]
    dense_a, dense_b = torch.kron(*a), torch.kron(*b)
    expected = float((dense_a - dense_b).norm() / dense_a.norm())
    assert abs(precision.product_difference(a, b) - expected) < 1e-12
    assert precision.product_difference(a, a) < 1e-7
