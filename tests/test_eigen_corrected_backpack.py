"""Eigenvalue-corrected K-FOC for BackPACK users: ``EKFOC``/``EKFOCExact`` on one batch,
``eigenvalue_correction`` over a data set.

Ground truth: dense GGN blocks from ``torch.func`` (``laplace_helpers.dense_blocks``:
``Σ_n J_nᵀ (diag p − p pᵀ) J_n``, the GGN of the summed cross-entropy) on a float64
MLP and a strided, padded CNN, uneven batches.
"""

from __future__ import annotations

import copy

import pytest
import torch
from backpack import backpack, extend
from laplace_helpers import dense_blocks, single_thread
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from kfoc_backpack import (
    EKFOC,
    KFOC,
    EKFOCExact,
    KFOCAccumulator,
    KFOCExact,
    eigenvalue_correction,
    optimal_factors,
)
from kfoc_backpack.blocks import EigenCorrected

__all__ = ["single_thread"]

BATCHES = [7, 3, 9, 4]


def problem(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if arch == "mlp":
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        X = torch.randn(sum(BATCHES), 4, generator=gen)
    else:
        model = nn.Sequential(
            nn.Conv2d(1, 3, 3, stride=2, padding=1),
            nn.Tanh(),
            nn.Conv2d(3, 2, 2),
            nn.Flatten(),
            nn.Linear(2 * 3 * 3, 3),
        )
        X = torch.randn(sum(BATCHES), 1, 8, 8, generator=gen)
    y = torch.randint(0, 3, (len(X),), generator=gen)
    return model.double(), X.double(), y


def batches(X: Tensor, y: Tensor) -> DataLoader:
    index, start = [], 0
    for size in BATCHES:
        index.append(list(range(start, start + size)))
        start += size
    return DataLoader(TensorDataset(X, y), batch_sampler=index)


def in_basis(F: Tensor, block: EigenCorrected) -> Tensor:
    basis = torch.kron(block.left_basis, block.right_basis)
    return torch.diagonal(basis.T @ F @ basis).reshape(block.diagonal.shape)


def assert_diagonalises(block: EigenCorrected, factors: list[Tensor]) -> None:
    for q, factor in zip((block.left_basis, block.right_basis), factors):
        rotated = q.T @ factor @ q
        off = rotated - torch.diag(torch.diagonal(rotated))
        assert off.norm() <= 1e-9 * factor.norm()


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_one_batch_exact(arch, reduction):
    """``weight.ekfoc_exact``: K-FOC's eigenbasis, the batch block's diagonal in it."""
    model, X, y = problem(arch)
    truth = dense_blocks(model, X, y, "classification", "ggn")
    scale = 1.0 if reduction == "sum" else 1.0 / len(X)
    net, loss = extend(copy.deepcopy(model)), extend(nn.CrossEntropyLoss(reduction=reduction))
    with backpack(KFOCExact(), EKFOCExact()):
        loss(net(X), y).backward()
    for name, param in net.named_parameters():
        F = truth[name] * scale
        if param.dim() == 1:
            torch.testing.assert_close(param.ekfoc_exact[0], F)
            continue
        block = param.ekfoc_exact
        assert isinstance(block, EigenCorrected)
        assert_diagonalises(block, param.kfoc_exact)
        torch.testing.assert_close(block.diagonal, in_basis(F, block), rtol=1e-8, atol=1e-12)
        assert block.trace().item() == pytest.approx(torch.trace(F).item(), rel=1e-10)
        kron = torch.kron(*param.kfoc_exact)
        assert (F - block.dense()).norm() <= (F - kron).norm() + 1e-12 * F.norm()


def test_one_batch_monte_carlo_shares_kfocs_labels():
    """``EKFOC`` under the seed of a ``KFOC`` pass: the same Fisher, so K-FOC's basis."""
    model, X, y = problem("cnn", seed=1)
    net, loss = extend(model), extend(nn.CrossEntropyLoss())
    torch.manual_seed(5)
    with backpack(KFOC(mc_samples=2)):
        loss(net(X), y).backward()
    factors = {name: p.kfoc for name, p in net.named_parameters()}
    torch.manual_seed(5)
    with backpack(EKFOC(mc_samples=2)):
        loss(net(X), y).backward()
    for name, param in net.named_parameters():
        if param.dim() > 1:
            assert_diagonalises(param.ekfoc, factors[name])
            assert torch.isfinite(param.ekfoc.diagonal).all()
            assert (param.ekfoc.diagonal >= 0).all()


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_data_set_correction_in_kfoc_and_kfac_bases(arch, reduction):
    """``eigenvalue_correction``: the data-set block's diagonal in the factors' basis."""
    model, X, y = problem(arch, seed=2)
    lossfunc = nn.CrossEntropyLoss(reduction=reduction)
    truth = dense_blocks(model, X, y, "classification", "ggn")
    scale = 1.0 if reduction == "sum" else 1.0 / len(X)
    optimum = optimal_factors(model, lossfunc, batches(X, y))
    net, loss = extend(copy.deepcopy(model)), extend(nn.CrossEntropyLoss(reduction=reduction))
    accumulator = KFOCAccumulator(net, "approx", savefield="kfoc_exact", reduction=reduction)
    for Xb, yb in batches(X, y):
        with backpack(KFOCExact()):
            loss(net(Xb), yb).backward()
        accumulator.update(len(Xb))
    for factors in (optimum.factors, accumulator.factors()):
        corrected = eigenvalue_correction(model, lossfunc, batches(X, y), factors)
        weights = [n for n, p in model.named_parameters() if p.dim() > 1]
        assert sorted(corrected) == sorted(weights)
        for name in weights:
            F = truth[name] * scale
            block = corrected[name]
            assert_diagonalises(block, factors[name])
            torch.testing.assert_close(block.diagonal, in_basis(F, block), rtol=1e-8, atol=1e-12)
            kron = torch.kron(*factors[name])
            assert (F - block.dense()).norm() <= (F - kron).norm() + 1e-12 * F.norm()


def test_data_set_monte_carlo_needs_the_factors_seed():
    model, X, y = problem("mlp")
    lossfunc = nn.CrossEntropyLoss()
    result = optimal_factors(model, lossfunc, batches(X, y), curvature="mc", seed=3)
    with pytest.raises(ValueError, match="seed"):
        eigenvalue_correction(model, lossfunc, batches(X, y), result.factors, curvature="mc")
    corrected = eigenvalue_correction(
        model, lossfunc, batches(X, y), result.factors, curvature="mc", seed=3
    )
    # the labels are the seed's: the same seed gives the same S, another seed another
    again = eigenvalue_correction(
        model, lossfunc, batches(X, y), result.factors, curvature="mc", seed=3
    )
    other = eigenvalue_correction(
        model, lossfunc, batches(X, y), result.factors, curvature="mc", seed=4
    )
    for name, block in corrected.items():
        assert_diagonalises(block, result.factors[name])
        torch.testing.assert_close(block.diagonal, again[name].diagonal)
        assert not torch.allclose(block.diagonal, other[name].diagonal)
