"""No float32 breakdown at any scale: every route against the float64 solve and the dense optimum.

Blocks whose entries lie anywhere from ``2⁻¹²⁰`` to ``2⁶⁰`` (output-side vectors and
inputs scaled by powers of two, balanced or not) must give, in float32, the factors of
the float64 solve within float32 precision, on every solve route (formed, factored,
position Gram, operator, grouped, rank-one ``Linear``, ``Linear`` on tokens; the CPU
and the accelerator routes), in the running merge and in the data-set optimum (stored
and streamed). A split that float32 cannot represent raises; an all-zero block gives
zero factors; a non-finite value names the weight.
"""

from __future__ import annotations

import copy

import pytest
import torch
from laplace import Laplace
from laplace_helpers import (
    optimal_error,
    rel_error,
    single_thread,  # noqa: F401 (autouse fixture)
)
from layouts import conv_terms, linear_terms
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kfoc_backpack.collect.layer_terms import named_failures
from kfoc_backpack.enums import Route
from kfoc_backpack.solver import ROUTE_TABLE, SolverOptions, merge_kronecker
from kfoc_backpack.solver._common import accelerator_routes

OPTIONS = SolverOptions(tol=1e-7, max_iter=1000)
ROUTES = tuple(route.route for route in ROUTE_TABLE if route.route is not Route.RANK_ONE)


def _base(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


GRADS, INPUTS = _base(0, 2, 5, 4, 6), _base(1, 5, 6, 6)  # [M, N, O, T], [N, I, T]

LAYERS = {
    **{
        f"conv-{route}": lambda g, a, route=route: conv_terms(a, g, route=route) for route in ROUTES
    },
    "conv-grouped": lambda g, a: conv_terms(a, g, groups=2),
    "linear": lambda g, a: linear_terms(a[:, :, 0], g[..., 0]),  # rank one: OuterTerms
    "linear-tokens": lambda g, a: linear_terms(a.mT, g.mT),  # [N, T, I], [M, N, T, O]
    "linear-tokens-long": lambda g, a: linear_terms(
        a.mT.repeat(1, 8, 1),
        g.mT.repeat(1, 1, 8, 1),  # T = 48 > O·I/(O+I): formed
    ),
}


def product(terms) -> torch.Tensor:
    left, right = terms.kfoc(terms.solve(OPTIONS))
    assert left.dtype == right.dtype == terms.input_trace.dtype
    return torch.kron(left.double(), right.double())


def scaled_layer(name: str, dtype: torch.dtype, grad_exp: int, input_exp: int):
    return LAYERS[name]((GRADS * 2.0**grad_exp).to(dtype), (INPUTS * 2.0**input_exp).to(dtype))


# block entries ≈ 2^(2·(grad_exp + input_exp))
EXPONENTS = [(-30, -30), (-15, -15), (0, 0), (8, 7), (15, 15), (-50, 10), (20, -40), (-10, 30)]


@pytest.mark.parametrize("accelerator", [False, True], ids=["cpu-routes", "accelerator-routes"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_float32_matches_float64_at_every_scale(name, accelerator):
    with accelerator_routes(accelerator):
        for grad_exp, input_exp in EXPONENTS:
            reference = scaled_layer(name, torch.float64, grad_exp, input_exp)
            exact = product(reference)
            got = product(scaled_layer(name, torch.float32, grad_exp, input_exp))
            difference = ((got - exact).norm() / exact.norm()).item()
            assert difference < 1e-4, (grad_exp, input_exp, difference)
            # the float64 solve is the optimum of the dense block
            dense = reference.terms.dense()
            left, right = reference.kfoc(reference.solve(OPTIONS))
            m, n = left.shape[0], right.shape[0]
            best = optimal_error(dense, m, n)
            assert rel_error(dense, left, right) == pytest.approx(best, abs=1e-6)


@pytest.mark.parametrize("name", list(LAYERS))
def test_zero_block_gives_zero_factors(name):
    terms = LAYERS[name](torch.zeros_like(GRADS).float(), INPUTS.float())
    left, right = terms.kfoc(terms.solve(OPTIONS))
    assert not left.any() and not right.any()


def test_unrepresentable_split_raises_naming_the_weight():
    """Output side at 2⁻⁸⁰, inputs at 2²⁰: K-FAC's split puts 2⁻¹⁶⁰ on the left factor."""
    terms = scaled_layer("conv-formed", torch.float32, -80, 20)
    with pytest.raises(FloatingPointError, match=r"^KFOCLaplace: 'conv\.weight'.*normal range"):
        terms.solve(OPTIONS, what="KFOCLaplace: 'conv.weight'")
    # in float64 the same block is fine
    left, right = scaled_layer("conv-formed", torch.float64, -80, 20).solve(OPTIONS)[:2]
    assert left.abs().max() > 0 and right.abs().max() > 0


def test_non_finite_terms_name_the_weight_lazily():
    grads = GRADS.float().clone()
    grads[0, 0, 0, 0] = float("nan")
    terms = LAYERS["conv-factored"](grads, INPUTS.float())
    calls = []

    def what():
        calls.append(1)
        return "KFOCExact: the weight (4, 6) of layer 'features.3' (Conv2d)"

    with pytest.raises(FloatingPointError, match=r"^KFOCExact: .*'features\.3'.*NaN"):
        terms.solve(OPTIONS, what=what)
    assert calls == [1]
    with named_failures(what):  # no failure: the name is never made
        pass
    assert calls == [1]


@pytest.mark.parametrize("exponent", [-60, -25, 0, 25, 45])
def test_running_merge_at_every_scale(exponent):
    """The closed-form merge of two products whose factors differ in scale by 2^±40."""
    left_a, right_a = _base(2, 4, 4), _base(3, 5, 5)
    left_b, right_b = _base(4, 4, 4), _base(5, 5, 5)
    left_a, left_b = left_a @ left_a.T, left_b @ left_b.T
    right_a, right_b = right_a @ right_a.T, right_b @ right_b.T
    scales = (2.0 ** (exponent - 40), 2.0 ** (exponent + 40), 2.0**exponent, 2.0**exponent)
    factors = [f * s for f, s in zip((left_a, right_a, left_b, right_b), scales)]
    products = []
    for dtype in (torch.float64, torch.float32):
        merged = merge_kronecker(*[f.to(dtype) for f in factors], 0.3, 0.7)
        products.append(torch.kron(merged.left.double(), merged.right.double()))
    assert ((products[1] - products[0]).norm() / products[0].norm()).item() < 1e-5


class Scaled(nn.Module):
    """MLP and convolution whose output-side vectors (``out``) and inputs (``inp``) are
    scaled by powers of two: a tiny head makes every earlier block tiny."""

    def __init__(self, out: int, inp: int):
        super().__init__()
        self.inp = inp
        self.fc = nn.Linear(4, 6)
        self.conv = nn.Conv1d(1, 3, 2)
        self.head = nn.Linear(15, 3)
        with torch.no_grad():
            self.head.weight.mul_(2.0**out)

    def forward(self, x):
        h = torch.tanh(self.fc(x)) * 2.0**self.inp
        return self.head(self.conv(h[:, None]).flatten(1))


@pytest.mark.parametrize("out, inp", [(-40, 0), (-60, 10), (0, -30), (-30, 25)])
def test_laplace_fits_in_float32_as_in_float64(out, inp):
    torch.manual_seed(0)
    model = Scaled(out, inp).double()
    X, y = torch.randn(24, 4, dtype=torch.float64), torch.randint(0, 3, (24,))
    settings = {
        "approx": {"aggregation": "approx"},
        "running": {"aggregation": "running"},
        "optimal-stored": {"aggregation": "optimal", "store_terms": True},
        "optimal-streamed": {"aggregation": "optimal", "store_terms": False, "max_passes": 300},
    }
    for label, kwargs in settings.items():
        fits = []
        for dtype in (torch.float64, torch.float32):
            la = Laplace(
                copy.deepcopy(model).to(dtype), "classification", "all", "kfoc", tol=1e-7, **kwargs
            )
            la.fit(DataLoader(TensorDataset(X.to(dtype), y), batch_size=8))
            fits.append(la.H_facs.kfacs)
        for reference, got in zip(*fits):
            exact = torch.kron(*[f.double() for f in reference]) if len(reference) == 2 else None
            exact = reference[0].double() if exact is None else exact
            value = torch.kron(*[f.double() for f in got]) if len(got) == 2 else got[0].double()
            assert exact.norm() > 0, label
            assert ((value - exact).norm() / exact.norm()).item() < 1e-4, label
