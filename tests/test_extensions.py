"""BackPACK extensions against ground truth computed independently of BackPACK."""

import copy
import re
import warnings

import pytest
import torch
from backpack import backpack, extend
from backpack.extensions import KFLR
from ground_truth import (
    dense_ggn_block,
    dense_ggn_sqrt,
    optimal_relative_error,
    relative_error,
)
from torch import nn

from kfoc_backpack import KFOC, KFOCExact
from kfoc_backpack.collect import LayerTerms
from kfoc_backpack.collect.hooks import TermCollector
from kfoc_backpack.extensions import KFOCTerms
from kfoc_backpack.solver import FactoredTerms, OuterTerms, SampleTerms, SolverOptions
from kfoc_backpack.solver._common import accelerator_routes


def mlp(out=3):
    return nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, out))


def cnn(out=3):
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3, stride=2, dilation=1, padding=2),
        nn.Sigmoid(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 2, 2, dilation=2, padding=1),
        nn.Flatten(),
        nn.Linear(2 * 2 * 2, out),
    )


def conv1d_net(out=3):
    return nn.Sequential(
        nn.Conv1d(2, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(12, out)
    )


def conv3d_net(out=3):
    return nn.Sequential(
        nn.Conv3d(1, 2, 2, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(2 * 4 * 4 * 4, out),
    )


INPUT_SHAPES = {mlp: (5,), cnn: (2, 6, 6), conv1d_net: (2, 8), conv3d_net: (1, 3, 3, 3)}


def problem(net, loss, reduction, batch=4, dtype=torch.float64, seed=0, out=3):
    torch.manual_seed(seed)
    model = net(out).to(dtype)
    inputs = torch.randn(batch, *INPUT_SHAPES[net], dtype=dtype)
    if loss is nn.CrossEntropyLoss:
        targets = torch.randint(0, out, (batch,))
    else:
        targets = torch.randn(batch, out, dtype=dtype)
    return model, loss(reduction=reduction), inputs, targets


def run(model, lossfunc, inputs, targets, ext):
    model, lossfunc = extend(model), extend(lossfunc)
    model.zero_grad()
    with backpack(ext):
        lossfunc(model(inputs), targets).backward()
    return {
        name: getattr(p, ext.savefield)
        for name, p in model.named_parameters()
        if hasattr(p, ext.savefield)
    }


CASES = [
    (net, loss, red)
    for net in (mlp, cnn, conv1d_net, conv3d_net)
    for loss in (nn.CrossEntropyLoss, nn.MSELoss)
    for red in ("mean", "sum")
]


@pytest.mark.parametrize("net,loss,reduction", CASES, ids=lambda x: getattr(x, "__name__", x))
def test_exact_is_optimal_for_dense_ggn(net, loss, reduction, routes):
    model, lossfunc, inputs, targets = problem(net, loss, reduction)
    sqrt = dense_ggn_sqrt(model, lossfunc, inputs, targets)
    factors = run(model, lossfunc, inputs, targets, KFOCExact())
    for name, value in factors.items():
        dense = dense_ggn_block(sqrt[name])
        if name.endswith("bias"):
            (block,) = value
            torch.testing.assert_close(block, dense, rtol=1e-10, atol=1e-12)
            continue
        left, right = value
        m, n = left.shape[0], right.shape[0]
        assert m * n == dense.shape[0], name
        best = optimal_relative_error(dense, m, n)
        got = relative_error(dense, left, right)
        assert got <= best + 1e-6, (name, got, best)
        for factor in (left, right):
            torch.testing.assert_close(factor, factor.T)
            assert torch.linalg.eigvalsh(factor).min() >= -1e-10 * factor.abs().max()


def test_scale_split_matches_kfac_convention():
    """tr(R_in) equals BackPACK's KFAC input factor's trace (K-FAC-compatible split)."""
    model, lossfunc, inputs, targets = problem(cnn, nn.CrossEntropyLoss, "mean")
    ours = run(copy.deepcopy(model), lossfunc, inputs, targets, KFOCExact())
    kflr = run(copy.deepcopy(model), lossfunc, inputs, targets, KFLR())
    for name, value in ours.items():
        if name.endswith("weight"):
            torch.testing.assert_close(torch.trace(value[1]), torch.trace(kflr[name][1]))


@pytest.mark.parametrize("loss", [nn.CrossEntropyLoss, nn.MSELoss])
def test_batch_of_one_linear_is_exact_and_equals_kflr(loss, routes):
    model, lossfunc, inputs, targets = problem(mlp, loss, "mean", batch=1)
    sqrt = dense_ggn_sqrt(model, lossfunc, inputs, targets)
    ours = run(copy.deepcopy(model), lossfunc, inputs, targets, KFOCExact())
    kflr = run(copy.deepcopy(model), lossfunc, inputs, targets, KFLR())
    for name, value in ours.items():
        if name.endswith("weight"):
            dense = dense_ggn_block(sqrt[name])
            assert relative_error(dense, *value) < 1e-10
            torch.testing.assert_close(value[0], kflr[name][0])
            torch.testing.assert_close(value[1], kflr[name][1])


@pytest.mark.parametrize("net", [mlp, cnn])
def test_mc_approaches_exact(net):
    model, lossfunc, inputs, targets = problem(net, nn.CrossEntropyLoss, "mean", batch=3)
    exact = run(copy.deepcopy(model), lossfunc, inputs, targets, KFOCExact())
    distances = []
    for mc in (1, 30, 3000):
        torch.manual_seed(1)
        approx = run(copy.deepcopy(model), lossfunc, inputs, targets, KFOC(mc_samples=mc))
        dist = [
            relative_error(torch.kron(*exact[k]), *approx[k]) for k in exact if k.endswith("weight")
        ]
        distances.append(max(dist))
    assert distances[0] > distances[1] > distances[2]
    assert distances[2] < 0.1


def test_mc_is_optimal_for_its_own_sampled_fisher(routes):
    """KFOC's factors are optimal for the MC Fisher of the same samples (SqrtGGNMC)."""
    from backpack.extensions import SqrtGGNMC

    model, lossfunc, inputs, targets = problem(cnn, nn.CrossEntropyLoss, "sum")
    torch.manual_seed(3)
    ours = run(copy.deepcopy(model), lossfunc, inputs, targets, KFOC(mc_samples=2))
    torch.manual_seed(3)
    sqrt = run(copy.deepcopy(model), lossfunc, inputs, targets, SqrtGGNMC(mc_samples=2))
    for name, value in ours.items():
        if name.endswith("weight"):
            flat = sqrt[name].flatten(start_dim=2).flatten(end_dim=1)
            dense = flat.T @ flat
            m, n = value[0].shape[0], value[1].shape[0]
            assert relative_error(dense, *value) <= optimal_relative_error(dense, m, n) + 1e-6


def test_identical_seeds_identical_factors():
    model, lossfunc, inputs, targets = problem(cnn, nn.CrossEntropyLoss, "mean")
    results = []
    for _ in range(2):
        torch.manual_seed(42)
        results.append(run(copy.deepcopy(model), lossfunc, inputs, targets, KFOC()))
    for name in results[0]:
        for a, b in zip(results[0][name], results[1][name], strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("net", [mlp, cnn])
def test_float32(net, routes):
    model, lossfunc, inputs, targets = problem(
        net, nn.CrossEntropyLoss, "mean", dtype=torch.float32
    )
    sqrt = dense_ggn_sqrt(model.double(), lossfunc, inputs.double(), targets)
    factors = run(model.float(), lossfunc, inputs, targets, KFOCExact())
    for name, value in factors.items():
        assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in value)
        if name.endswith("weight"):
            dense = dense_ggn_block(sqrt[name])
            best = optimal_relative_error(dense, value[0].shape[0], value[1].shape[0])
            assert relative_error(dense, *value) <= best + 1e-4


def test_uneven_and_zero_gradients(routes):
    """Dead ReLUs give all-zero factors for the layer behind them, never NaN."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # every hidden unit dead
    inputs, targets = torch.randn(5, 3).double(), torch.randint(0, 2, (5,))
    factors = run(model, nn.CrossEntropyLoss(), inputs, targets, KFOCExact())
    for value in factors["0.weight"] + factors["0.bias"] + factors["2.weight"]:
        assert torch.isfinite(value).all() and not value.any()  # zero per-sample terms
    assert factors["2.bias"][0].any()


def test_linear_with_extra_input_dimensions(routes):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.Flatten())
    model = model.double()
    inputs, targets = torch.randn(4, 5, 3).double(), torch.randn(4, 10).double()
    lossfunc = nn.MSELoss()
    sqrt = dense_ggn_sqrt(model, lossfunc, inputs, targets)
    factors = run(model, lossfunc, inputs, targets, KFOCExact())
    for name, value in factors.items():
        dense = dense_ggn_block(sqrt[name])
        if name.endswith("bias"):
            torch.testing.assert_close(value[0], dense)
        else:
            best = optimal_relative_error(dense, value[0].shape[0], value[1].shape[0])
            assert relative_error(dense, *value) <= best + 1e-6


def test_terms_extension_matches_dense_and_kfac():
    model, lossfunc, inputs, targets = problem(cnn, nn.CrossEntropyLoss, "mean")
    sqrt = dense_ggn_sqrt(model, lossfunc, inputs, targets)
    terms = run(copy.deepcopy(model), lossfunc, inputs, targets, KFOCTerms("ggn"))
    kflr = run(copy.deepcopy(model), lossfunc, inputs, targets, KFLR())
    for name, value in terms.items():
        if not name.endswith("weight"):
            continue
        assert isinstance(value, LayerTerms)
        # convolutions: formed or factored, whichever costs fewer flops for the layer
        shared = (SampleTerms, FactoredTerms)
        assert isinstance(value.terms, OuterTerms if name.startswith("7") else shared)
        torch.testing.assert_close(value.terms.dense(), dense_ggn_block(sqrt[name]))
        if name.startswith("7"):  # Linear: K-FAC factors are BackPACK's KFLR
            torch.testing.assert_close(value.kfac[0], kflr[name][0])
            torch.testing.assert_close(value.kfac[1], kflr[name][1])


@pytest.mark.parametrize("classes", [2, 3, 5])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_exact_cross_entropy_backpropagates_classes_minus_one_columns(classes, reduction):
    """Cross-entropy's exact GGN starts with ``C − 1`` columns, BackPACK's with ``C``.

    The per-sample blocks (dense GGN from ``torch.func``), BackPACK's ``KFLR`` factors and
    the hook route's terms are unchanged; ``MSELoss`` keeps one column per output.
    """
    model, lossfunc, inputs, targets = problem(
        cnn, nn.CrossEntropyLoss, reduction, batch=3, out=classes
    )
    sqrt = dense_ggn_sqrt(model, lossfunc, inputs, targets)
    terms = run(copy.deepcopy(model), lossfunc, inputs, targets, KFOCTerms("ggn"))
    kflr = run(copy.deepcopy(model), lossfunc, inputs, targets, KFLR())
    head = terms["7.weight"].terms
    assert isinstance(head, OuterTerms) and head.sqrt_out.shape[:2] == (3, classes - 1)
    for name, value in terms.items():
        if name.endswith("weight"):
            torch.testing.assert_close(value.terms.dense(), dense_ggn_block(sqrt[name]))
            if name == "7.weight":  # Linear: K-FAC's factors of the C − 1 columns are KFLR's
                torch.testing.assert_close(value.kfac[0], kflr[name][0])
                torch.testing.assert_close(value.kfac[1], kflr[name][1])
        else:
            torch.testing.assert_close(value[0], dense_ggn_block(sqrt[name]))
    hooked = TermCollector(copy.deepcopy(model), lossfunc)(inputs, targets).weights
    assert hooked["7.weight"].terms.sqrt_out.shape[:2] == (3, classes - 1)
    torch.testing.assert_close(hooked["7.weight"].terms.dense(), head.dense())
    mse = problem(cnn, nn.MSELoss, reduction, batch=3, out=classes)
    head_mse = run(*mse, KFOCTerms("ggn"))["7.weight"].terms
    assert head_mse.sqrt_out.shape[:2] == (3, classes)


# ------------------------------------------------------------------------ bad input


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.scale


@pytest.mark.parametrize(
    "layer", [nn.BatchNorm1d(3), nn.Embedding(3, 3), Custom()], ids=lambda m: type(m).__name__
)
def test_unsupported_parameterised_layer_raises_naming_it(layer):
    if isinstance(layer, nn.Embedding):
        model = nn.Sequential(layer, nn.Flatten(), nn.Linear(6, 2))
        inputs = torch.randint(0, 3, (4, 2))
    else:
        model = nn.Sequential(nn.Linear(2, 3), layer, nn.Linear(3, 2))
        inputs = torch.randn(4, 2)
    targets = torch.randint(0, 2, (4,))
    with pytest.raises(NotImplementedError, match=type(layer).__name__) as info:
        run(model, nn.CrossEntropyLoss(), inputs, targets, KFOC())
    assert "Linear, Conv1d, Conv2d, Conv3d" in str(info.value)


def test_fail_mode_warning_skips_unsupported_layer():
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)).double()
    inputs, targets = torch.randn(4, 2).double(), torch.randint(0, 2, (4,))
    with pytest.warns(UserWarning, match="BatchNorm1d"):
        factors = run(model, nn.CrossEntropyLoss(), inputs, targets, KFOCExact(fail_mode="WARNING"))
    assert not hasattr(model[1].weight, "kfoc_exact")
    assert len(factors["0.weight"]) == 2 and len(factors["2.weight"]) == 2


def test_frozen_unsupported_layer_is_fine():
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)).double().eval()
    for p in model[1].parameters():
        p.requires_grad_(False)
    inputs, targets = torch.randn(4, 2).double(), torch.randint(0, 2, (4,))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message="Full backward hook")
        run(model, nn.CrossEntropyLoss(), inputs, targets, KFOCExact())
    assert len(model[0].weight.kfoc_exact) == 2


@pytest.mark.parametrize(
    "conv, problem_text",
    [
        (nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
        (nn.Conv2d(2, 4, 3, padding="same"), "padding='same'"),
    ],
)
def test_fail_mode_warning_skips_unsupported_conv_settings(conv, problem_text):
    """``fail_mode='WARNING'`` skips every unsupported setting with a warning naming it."""
    model = nn.Sequential(nn.Conv2d(2, 2, 1), conv, nn.Flatten(), nn.Linear(64, 2)).double()
    inputs, targets = torch.randn(3, 2, 4, 4).double(), torch.tensor([0, 1, 1])
    reference = copy.deepcopy(model)
    with pytest.raises(NotImplementedError, match=re.escape(problem_text)):
        run(copy.deepcopy(model), nn.CrossEntropyLoss(), inputs, targets, KFOCExact())
    tight = {"tol": 1e-12, "max_iter": 5000}
    with pytest.warns(UserWarning, match=re.escape(f"layer '1' (Conv2d) with {problem_text}")):
        factors = run(
            model, nn.CrossEntropyLoss(), inputs, targets, KFOCExact(fail_mode="WARNING", **tight)
        )
    assert "1.weight" not in factors and "1.bias" not in factors
    assert len(factors["3.weight"]) == 2
    # the layer before it got the square root through the skipped layer: compare with the
    # hook route, which differentiates the convolution with autograd
    for p in reference[1].parameters():
        p.requires_grad_(False)
    batch = TermCollector(reference, nn.CrossEntropyLoss())(inputs, targets)
    expected = batch.weights["0.weight"]
    left, right = expected.kfoc(expected.solve(SolverOptions(**tight)))
    torch.testing.assert_close(factors["0.weight"][0], left, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(factors["0.weight"][1], right, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(factors["0.bias"][0], batch.dense["0.bias"].exact.matrix)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message="Full backward hook")
        run(model, nn.CrossEntropyLoss(), inputs, targets, KFOCExact(fail_mode="SILENT"))


def test_warnings_name_the_layer_path():
    """Two unconverged layers give two warnings, each naming its module path."""

    body = nn.Sequential(nn.Conv2d(1, 3, 2), nn.ReLU(), nn.Conv2d(3, 2, 2))
    model = nn.Sequential(body, nn.Flatten(), nn.Linear(8, 3)).double()
    inputs, targets = torch.randn(5, 1, 4, 4).double(), torch.randint(0, 3, (5,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(model, nn.CrossEntropyLoss(), inputs, targets, KFOCExact(tol=1e-15, max_iter=1))
    texts = [str(w.message) for w in caught if "max_iter=1" in str(w.message)]
    assert any("layer '0.0' (Conv2d)" in t for t in texts)
    assert any("layer '0.2' (Conv2d)" in t for t in texts)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="mc_samples"):
        KFOC(mc_samples=0)
    with pytest.raises(ValueError, match="fail_mode"):
        KFOC(fail_mode="IGNORE")
    with pytest.raises(ValueError, match="tol"):
        KFOCExact(tol=-1)


def test_solve_log_records_iterations(routes):
    model, lossfunc, inputs, targets = problem(cnn, nn.CrossEntropyLoss, "mean")
    ext = KFOCExact()
    run(model, lossfunc, inputs, targets, ext)
    assert [r.module for r in ext.solve_log] == ["Linear", "Conv2d", "Conv2d", "Conv2d"]
    assert all(r.converged and r.iterations >= 1 for r in ext.solve_log)


def test_non_convergence_warns(routes):
    model, lossfunc, inputs, targets = problem(cnn, nn.CrossEntropyLoss, "mean")
    with pytest.warns(RuntimeWarning, match="max_iter=1"):
        run(model, lossfunc, inputs, targets, KFOCExact(tol=1e-15, max_iter=1, exact_max_terms=0))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_unsettled_coefficient_problems_are_solved_exactly(dtype, routes):
    """A power method stopped far from ``tol`` is finished by the exact small solve.

    ``max_iter=1`` with ``tol=1e-15`` stops every power method early; the ``Linear``
    layer (a coefficient problem of ``K = 4`` terms) and, on the accelerator routes,
    the convolutions (operator route, ``C_out² ≤ 16``) must still be optimal for the
    dense GGN, positive semi-definite and marked converged.
    """
    model, lossfunc, inputs, targets = problem(cnn, nn.CrossEntropyLoss, "sum", dtype=dtype)
    sqrt = dense_ggn_sqrt(model, lossfunc, inputs, targets)
    ext = KFOCExact(tol=1e-15, max_iter=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        factors = run(model, lossfunc, inputs, targets, ext)
    exact_layers = {"Linear"} | ({"Conv2d"} if routes == "accelerator-routes" else set())
    solved = [r for r in ext.solve_log if r.module in exact_layers]
    assert solved and all(r.converged and r.iterations == 1 for r in solved)
    unconverged = [r for r in ext.solve_log if not r.converged]
    assert len([w for w in caught if "max_iter=1" in str(w.message)]) == len(unconverged)
    for name, (left, right) in ((n, v) for n, v in factors.items() if n.endswith("weight")):
        layer = model[int(name.split(".")[0])]
        if type(layer).__name__ not in exact_layers:
            continue
        dense = dense_ggn_block(sqrt[name])
        best = optimal_relative_error(dense, left.shape[0], right.shape[0])
        slack = 1e-8 if dtype == torch.float64 else 1e-4
        assert relative_error(dense, left, right) <= best + slack
        for factor in (left, right):
            assert torch.linalg.eigvalsh(factor.double()).min() >= -1e-5 * factor.abs().max()


def test_exact_max_terms_is_validated():
    with pytest.raises(ValueError, match="exact_max_terms"):
        KFOC(exact_max_terms=-1)
    with pytest.raises(ValueError, match="exact_max_terms"):
        KFOCExact(exact_max_terms=2.5)


# --------------------------------------------------------------------------- memory


def test_linear_never_allocates_per_sample_gradients():
    """No tensor of ``N·out·in`` elements exists while KFOC runs on a Linear layer."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestTensor(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    LargestTensor.largest = max(LargestTensor.largest, t.numel())
            return out

    num, dim_in, dim_out = 64, 120, 100
    model = extend(nn.Sequential(nn.Linear(dim_in, dim_out), nn.ReLU(), nn.Linear(dim_out, 10)))
    lossfunc = extend(nn.CrossEntropyLoss())
    inputs, targets = torch.randn(num, dim_in), torch.randint(0, 10, (num,))
    for ext in (KFOC(), KFOCExact()):
        LargestTensor.largest = 0
        with LargestTensor(), backpack(ext):
            lossfunc(model(inputs), targets).backward()
        assert LargestTensor.largest < num * dim_in * dim_out / 10, LargestTensor.largest
    # the same probe does see per-sample gradients when they are formed
    LargestTensor.largest = 0
    with LargestTensor():
        torch.einsum("no,ni->noi", torch.randn(num, dim_out), inputs)
    assert LargestTensor.largest == num * dim_in * dim_out


@pytest.mark.parametrize("net", [mlp, cnn])
def test_device_is_optimal_and_agrees_with_cpu(net, device):
    """Factors computed on ``device`` (CUDA when present) are optimal, like the CPU ones.

    Accelerators (and the CPU on the accelerator routes) take other routes, so the
    iterate where the solver stops differs from the CPU's within the tolerance: compare
    errors.
    """
    model, lossfunc, inputs, targets = problem(net, nn.CrossEntropyLoss, "mean")
    sqrt = dense_ggn_sqrt(model, lossfunc, inputs, targets)
    with accelerator_routes(False):  # the CPU's own routes as the reference
        cpu = run(copy.deepcopy(model), lossfunc, inputs, targets, KFOCExact())
    on_device = run(
        copy.deepcopy(model).to(device),
        lossfunc,
        inputs.to(device),
        targets.to(device),
        KFOCExact(),
    )
    for name, value in on_device.items():
        assert all(v.device.type == device.type for v in value)
        value = [v.cpu() for v in value]
        dense = dense_ggn_block(sqrt[name])
        if name.endswith("bias"):
            torch.testing.assert_close(value[0], cpu[name][0])
            continue
        got, want = relative_error(dense, *value), relative_error(dense, *cpu[name])
        assert abs(got - want) < 1e-6, (name, got, want)
        torch.testing.assert_close(torch.trace(value[1]), torch.trace(cpu[name][1]))


def test_dropout_padding_avgpool_around_layers():
    """BackPACK's dropout (eval mode), zero padding and average pooling in the graph.

    float32: BackPACK's average-pooling derivatives fail in float64 (they build a float32
    convolution internally), so the factors are checked against a float64 reference.
    """
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.ZeroPad2d(1),
        nn.Conv2d(1, 2, 3),
        nn.AvgPool2d(2),
        nn.ELU(),
        nn.Flatten(),
        nn.Dropout(0.3),
        nn.Linear(2 * 3 * 3, 4),
        nn.LeakyReLU(),
        nn.Linear(4, 3),
    )
    model.eval()
    inputs, targets = torch.randn(5, 1, 6, 6), torch.randint(0, 3, (5,))
    lossfunc = nn.CrossEntropyLoss()
    sqrt = dense_ggn_sqrt(copy.deepcopy(model).double(), lossfunc, inputs.double(), targets)
    factors = run(model, lossfunc, inputs, targets, KFOCExact())
    assert set(factors) == {"1.weight", "1.bias", "6.weight", "6.bias", "8.weight", "8.bias"}
    for name, value in factors.items():
        dense = dense_ggn_block(sqrt[name])
        if name.endswith("bias"):
            torch.testing.assert_close(value[0].double(), dense, rtol=1e-4, atol=1e-6)
        else:
            best = optimal_relative_error(dense, value[0].shape[0], value[1].shape[0])
            assert relative_error(dense, *value) <= best + 1e-4
