"""Grouped and depthwise convolutions: K-FOC of the ``[C_out, C_in/groups·Πkernel]`` weight.

Both collection routes (the hook route of the laplace-torch backends, BackPACK's
``KFOCExact``) against the Frobenius-optimal Kronecker product of the dense GGN block
from ``torch.func`` (float64), for ``groups = 2`` and depthwise (``groups = C_in``,
channel multipliers 1 and 2), with stride, dilation and padding; float32 against the
float64 solve; K-FAC's grouped factors against their definition.
"""

from __future__ import annotations

import copy

import pytest
import torch
from backpack import backpack, extend
from laplace import Laplace
from laplace_helpers import (
    dense_ggn_blocks,
    optimal_error,
    rel_error,
    single_thread,  # noqa: F401 (autouse fixture)
)
from layouts import conv_terms
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kfoc_backpack import KFOCBackend, KFOCExact
from kfoc_backpack.collect.handover import grouped_kfc_factors, kfc_factors
from kfoc_backpack.collect.hooks import TermCollector
from kfoc_backpack.enums import Grouped
from kfoc_backpack.solver import SolverOptions

TIGHT = {"tol": 1e-12, "max_iter": 5000}
NUM = 6

# (conv class, C_in, C_out, groups, keyword arguments, spatial input size)
CONVS = {
    "groups2-strided": (nn.Conv2d, 4, 6, 2, {"stride": 2, "padding": 1}, (7, 7)),
    "depthwise-dilated": (nn.Conv2d, 4, 4, 4, {"dilation": 2, "padding": 2}, (6, 6)),
    "depthwise-multiplier2": (nn.Conv2d, 3, 6, 3, {"padding": 1, "stride": (1, 2)}, (5, 6)),
    "conv1d-depthwise": (nn.Conv1d, 5, 5, 5, {"padding": 1}, (9,)),
}


def model_for(case: str, dtype=torch.float64) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    conv_cls, c_in, c_out, groups, kwargs, spatial = CONVS[case]
    torch.manual_seed(0)
    conv = conv_cls(c_in, c_out, 3, groups=groups, **kwargs)
    X = torch.randn(NUM, c_in, *spatial)
    features = nn.Sequential(conv, nn.Tanh(), nn.Flatten())
    model = nn.Sequential(*features, nn.Linear(features(X).shape[1], 3))
    y = torch.randint(0, 3, (NUM,))
    return model.to(dtype), X.to(dtype), y


def assert_weight_optimal(model, blocks, factors, tol=1e-7):
    weight = model[0].weight
    block = blocks["0.weight"]
    best = optimal_error(block, weight.shape[0], weight[0].numel())
    assert rel_error(block, *factors) == pytest.approx(best, abs=tol)
    # the factors have the weight's own shape: C_out and C_in/groups·Πkernel
    assert factors[0].shape == (weight.shape[0],) * 2
    assert factors[1].shape == (weight[0].numel(),) * 2


@pytest.mark.parametrize("case", list(CONVS))
def test_hook_route_is_optimal(case):
    model, X, y = model_for(case)
    _, kron = KFOCBackend(model, "classification", **TIGHT).kron(X, y, N=NUM)
    blocks = dense_ggn_blocks(model, X, "classification")
    assert_weight_optimal(model, blocks, kron.kfacs[0])
    torch.testing.assert_close(kron.kfacs[1][0], blocks["0.bias"], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("case", list(CONVS))
def test_backpack_route_is_optimal(case):
    model, X, y = model_for(case)
    blocks = dense_ggn_blocks(model, X, "classification")
    extended = extend(copy.deepcopy(model))
    lossfunc = extend(nn.CrossEntropyLoss(reduction="sum"))
    with backpack(KFOCExact(**TIGHT)):
        lossfunc(extended(X), y).backward()
    assert_weight_optimal(model, blocks, extended[0].weight.kfoc_exact)
    torch.testing.assert_close(
        extended[0].bias.kfoc_exact[0], blocks["0.bias"], rtol=1e-9, atol=1e-12
    )


@pytest.mark.parametrize("case", ["groups2-strided", "depthwise-multiplier2"])
def test_float32_matches_float64(case):
    model64, X64, y = model_for(case)
    model32, X32 = copy.deepcopy(model64).float(), X64.float()
    products = []
    for model, X in ((model64, X64), (model32, X32)):
        batch = TermCollector(model, nn.CrossEntropyLoss(reduction="sum"))(X, y)
        terms = batch.weights["0.weight"].with_structure(Grouped.COUPLED)
        left, right = terms.kfoc(terms.solve(SolverOptions(tol=1e-7)))
        assert left.dtype == X.dtype
        products.append(torch.kron(left.double(), right.double()))
    difference = (products[0] - products[1]).norm() / products[0].norm()
    assert difference < 1e-4


def test_routes_and_kfac_factors_of_a_grouped_layer():
    """``operator`` equals ``formed``; K-FAC's factors are those of the zero-padded positions."""
    gen = torch.Generator().manual_seed(3)
    columns, num, groups, out_per, in_per, positions = 2, 3, 4, 2, 5, 7
    sqrt = torch.randn(columns, num, groups * out_per, positions, generator=gen).double()
    unfolded = torch.randn(num, groups * in_per, positions, generator=gen).double()
    options = SolverOptions(**TIGHT)
    formed = conv_terms(unfolded, sqrt, with_kfac=True, groups=groups)
    operator = conv_terms(unfolded, sqrt, route="operator", groups=groups)
    assert formed.terms.route == "formed" and operator.terms.route == "operator"
    for a, b in zip(formed.kfoc(formed.solve(options)), operator.kfoc(operator.solve(options))):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
    with pytest.raises(ValueError, match="groups=4.*'formed' and 'operator'"):
        conv_terms(unfolded, sqrt, route="gram", groups=groups)
    # the same weight as an ungrouped layer on groups·T positions whose output-side
    # vectors are zero outside their group
    padded = torch.zeros(columns, num, groups, groups * out_per, positions).double()
    for g in range(groups):
        rows = slice(g * out_per, (g + 1) * out_per)
        padded[:, :, g, rows] = sqrt[:, :, rows]
    padded = padded.permute(0, 1, 3, 2, 4).flatten(start_dim=3)  # [M, N, O, g·T]
    inputs = unfolded.unflatten(1, (groups, in_per)).transpose(1, 2).flatten(start_dim=2)
    expected = kfc_factors(padded.transpose(2, 3), inputs.transpose(1, 2))
    for a, b in zip(grouped_kfc_factors(sqrt, unfolded, groups), expected):
        torch.testing.assert_close(a, b)
    for a, b in zip(formed.kfac, expected):
        torch.testing.assert_close(a, b)
    dense = conv_terms(inputs, padded, route="formed")
    for a, b in zip(formed.kfoc(formed.solve(options)), dense.kfoc(dense.solve(options))):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


class SeparableNet(nn.Module):
    """A MobileNet-style block: stem, depthwise 3×3, pointwise 1×1, residual, head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 6, 3, padding=1)
        self.depthwise = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.pointwise = nn.Conv2d(6, 6, 1)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = h + self.pointwise(torch.relu(self.depthwise(h)))
        return self.head(h.mean(dim=(2, 3)))


def test_laplace_fits_a_separable_network():
    torch.manual_seed(0)
    model = SeparableNet().double()
    X, y = torch.randn(10, 2, 5, 5).double(), torch.randint(0, 3, (10,))
    la = Laplace(
        copy.deepcopy(model),
        "classification",
        "all",
        "kfoc",
        aggregation="optimal",
        tol=1e-11,
        max_passes=5000,
        backend_kwargs=TIGHT,
    )
    la.fit(DataLoader(TensorDataset(X, y), batch_size=4))
    blocks = dense_ggn_blocks(model, X, "classification")
    names = [n for n, _ in model.named_parameters()]
    for name, factors in zip(names, la.H_facs.kfacs):
        param = dict(model.named_parameters())[name]
        if param.dim() > 1:
            best = optimal_error(blocks[name], param.shape[0], param[0].numel())
            assert rel_error(blocks[name], *factors) == pytest.approx(best, abs=1e-6), name
    probs = la(X[:3], pred_type="glm")
    assert torch.isfinite(probs).all() and torch.isfinite(la.log_marginal_likelihood())
