"""KFOCBackend: laplace-torch curvature backend with K-FOC factors."""

from __future__ import annotations

import pytest
import torch
from laplace import DiagLaplace, FullLaplace, KronLaplace
from laplace.curvature import BackPackGGN, BackPackInterface, CurvatureInterface
from laplace_helpers import (
    NUM_DATA,
    dense_ggn_blocks,
    is_extended,
    make_problem,
    optimal_error,
    rel_error,
    single_thread,  # noqa: F401 (autouse fixture)
    trainable,
)
from torch import nn

from kfoc_backpack import KFOCBackend

SOLVE = {"tol": 1e-10, "max_iter": 1000}


@pytest.fixture(scope="module", params=["classification", "regression"])
def problem(request):
    return make_problem("mlp", request.param)


def backend_for(problem, model=None, **kwargs):
    model = problem.fresh_model() if model is None else model
    return KFOCBackend(model, problem.likelihood, **{**SOLVE, **kwargs})


def test_not_special_cased_by_laplace():
    assert not issubclass(KFOCBackend, BackPackInterface)
    name = KFOCBackend.__name__.lower()
    assert "backpack" not in name and "asdl" not in name


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_kron_is_batch_optimum_in_laplace_scaling(arch):
    """With M = N the factors are the optimum of the batch's (factor-scaled) GGN block."""
    for likelihood in ("classification", "regression"):
        problem = make_problem(arch, likelihood)
        blocks = dense_ggn_blocks(problem.model, problem.X, likelihood)
        backend = backend_for(problem)
        loss, kron = backend.kron(problem.X, problem.y, N=NUM_DATA)
        lossfunc = backend.lossfunc
        expected_loss = backend.factor * lossfunc(problem.model(problem.X), problem.y)
        torch.testing.assert_close(loss, expected_loss.detach())
        for (name, param), factors in zip(trainable(problem.model), kron.kfacs):
            if param.dim() == 1:
                torch.testing.assert_close(factors[0], blocks[name], rtol=1e-9, atol=1e-12)
                continue
            best = optimal_error(blocks[name], param.shape[0], param[0].numel())
            assert rel_error(blocks[name], *factors) == pytest.approx(best, abs=1e-6)


def test_kron_equals_backpack_on_kronecker_block():
    """A regression model's linear output layer has an exactly Kronecker block."""
    problem = make_problem("mlp", "regression")
    model = nn.Sequential(nn.Linear(4, 3)).double()
    X, y = problem.X[:9], problem.y[:9, :1].expand(-1, 3).contiguous()
    ours = KFOCBackend(model, "regression").kron(X, y, N=NUM_DATA)
    theirs = BackPackGGN(nn.Sequential(nn.Linear(4, 3)).double(), "regression")
    theirs.model.load_state_dict(model.state_dict())
    theirs = theirs.kron(X, y, N=NUM_DATA)
    torch.testing.assert_close(ours[0], theirs[0])
    for mine, other in zip(ours[1].kfacs, theirs[1].kfacs):
        for a, b in zip(mine, other):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_diag_jacobians_gradients_match_reference(problem):
    model = problem.fresh_model()
    backend = backend_for(problem, model)
    blocks = dense_ggn_blocks(model, problem.X, problem.likelihood)
    loss, diag = backend.diag(problem.X, problem.y)
    expected = torch.cat([blocks[name].diagonal() for name, _ in trainable(model)])
    torch.testing.assert_close(diag, expected, rtol=1e-9, atol=1e-12)
    Js, f = backend.jacobians(problem.X)
    ref_Js, ref_f = CurvatureInterface.jacobians(backend, problem.X)  # torch.func
    torch.testing.assert_close(Js, ref_Js)
    torch.testing.assert_close(f, ref_f)
    Gs, loss_g = backend.gradients(problem.X, problem.y)
    ref_Gs, ref_loss = CurvatureInterface.gradients(backend, problem.X, problem.y)
    torch.testing.assert_close(Gs, ref_Gs)
    torch.testing.assert_close(loss_g, ref_loss.detach())
    # torch.func worked on the same model after our calls: it is not left extended
    assert not is_extended(model)


def test_subnetwork_indices_select_like_backpack(problem):
    indices = torch.tensor([0, 3, 7, 20])
    backend = backend_for(problem, subnetwork_indices=indices)
    full = backend_for(problem)
    torch.testing.assert_close(
        backend.diag(problem.X, problem.y)[1], full.diag(problem.X, problem.y)[1][indices]
    )
    torch.testing.assert_close(
        backend.jacobians(problem.X)[0], full.jacobians(problem.X)[0][:, :, indices]
    )


def test_calls_leave_model_and_grads_untouched(problem):
    model = problem.fresh_model()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    backend = backend_for(problem, model)
    backend.kron(problem.X, problem.y, N=NUM_DATA)
    backend.diag(problem.X, problem.y)
    backend.jacobians(problem.X)
    assert not is_extended(model)
    assert all(torch.all(p.grad == 7.0) for p in model.parameters())
    assert not any(hasattr(p, "kfoc_exact") or hasattr(p, "grad_batch") for p in model.parameters())


def test_stochastic_gives_mc_fisher():
    problem = make_problem("mlp", "classification")
    exact = backend_for(problem).kron(problem.X, problem.y, N=NUM_DATA)[1]
    mc = backend_for(problem, stochastic=True, num_samples=400)

    def sampled(seed):
        torch.manual_seed(seed)
        return mc.kron(problem.X, problem.y, N=NUM_DATA)[1]

    first, again, other = sampled(0), sampled(0), sampled(1)
    for a, b, c, e in zip(first.kfacs, again.kfacs, other.kfacs, exact.kfacs):
        torch.testing.assert_close(a[0], b[0])
        assert not torch.allclose(a[0], c[0])
        prod = torch.kron(*a) if len(a) == 2 else a[0]
        target = torch.kron(*e) if len(e) == 2 else e[0]
        assert (prod - target).norm() / target.norm() < 0.25  # MC Fisher ≈ GGN
    torch.manual_seed(0)
    diag_mc = mc.diag(problem.X, problem.y)[1]
    diag_exact = backend_for(problem).diag(problem.X, problem.y)[1]
    assert (diag_mc - diag_exact).norm() / diag_exact.norm() < 0.25


@pytest.mark.parametrize("laplace_cls", [KronLaplace, DiagLaplace, FullLaplace])
def test_laplace_classes_with_backend(problem, laplace_cls):
    la = laplace_cls(problem.fresh_model(), problem.likelihood, backend=KFOCBackend)
    la.fit(problem.loader())
    out = la(problem.X[:5], pred_type="glm")
    outs = out if isinstance(out, tuple) else (out,)
    assert all(torch.isfinite(o).all() for o in outs)
    assert torch.isfinite(la.log_marginal_likelihood())
    if laplace_cls is FullLaplace:  # the full GGN is the dense ground truth
        blocks = dense_ggn_blocks(problem.model, problem.X, problem.likelihood)
        names = [name for name, _ in trainable(problem.model)]
        sizes = [blocks[n].shape[0] for n in names]
        diag_blocks = torch.block_diag(*[blocks[n] for n in names])
        mask = torch.block_diag(*[torch.ones(s, s, dtype=torch.bool) for s in sizes])
        torch.testing.assert_close(la.H[mask], diag_blocks[mask], rtol=1e-9, atol=1e-10)


def frozen_model(problem):
    model = problem.fresh_model()
    for p in model[0].parameters():
        p.requires_grad_(False)
    return model


def test_frozen_parameters_supported(problem):
    model = frozen_model(problem)
    with pytest.raises(ValueError, match="BackPACK"):
        KronLaplace(frozen_model(problem), problem.likelihood, backend=BackPackGGN)
    la = KronLaplace(model, problem.likelihood, backend=KFOCBackend, backend_kwargs=SOLVE)
    la.fit(problem.loader([NUM_DATA]))
    params = trainable(model)
    assert la.n_params == sum(p.numel() for _, p in params)
    blocks = dense_ggn_blocks(model, problem.X, problem.likelihood)
    for (name, param), factors in zip(params, la.H_facs.kfacs):
        if param.dim() > 1:
            best = optimal_error(blocks[name], param.shape[0], param[0].numel())
            assert rel_error(blocks[name], *factors) == pytest.approx(best, abs=1e-6)
    out = la(problem.X[:4], pred_type="glm", link_approx="probit")
    outs = out if isinstance(out, tuple) else (out,)
    assert all(torch.isfinite(o).all() for o in outs)


class DictModel(nn.Module):
    """Takes a Hugging Face style dict batch."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, batch):
        return self.inner(batch["input_ids"])


def test_dict_inputs_match_tensor_inputs(problem):
    model = problem.fresh_model()
    backend = backend_for(problem, DictModel(model))
    ref = backend_for(problem, model)
    batch = {"input_ids": problem.X, "labels": problem.y}
    loss, kron = backend.kron(batch, problem.y, N=NUM_DATA)
    ref_loss, ref_kron = ref.kron(problem.X, problem.y, N=NUM_DATA)
    torch.testing.assert_close(loss, ref_loss)
    for mine, other in zip(kron.kfacs, ref_kron.kfacs):
        for a, b in zip(mine, other):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(backend.jacobians(batch)[0], ref.jacobians(problem.X)[0])
    torch.testing.assert_close(backend.diag(batch, problem.y)[1], ref.diag(problem.X, problem.y)[1])


@pytest.mark.parametrize(
    "layer",
    [nn.BatchNorm1d(6).eval(), nn.Conv1d(1, 1, 1, padding_mode="circular")],
    ids=["batchnorm", "circular-conv"],
)
def test_layers_outside_the_factored_kinds_get_exact_blocks(layer):
    """A normalisation layer (its kind) or a circular convolution (``torch.func``): exact."""
    torch.manual_seed(0)
    middle = (
        nn.Sequential(nn.Unflatten(1, (1, 6)), layer, nn.Flatten())
        if "Conv" in str(layer)
        else layer
    )
    model = nn.Sequential(nn.Linear(4, 6), middle, nn.Tanh(), nn.Linear(6, 2)).double().eval()
    X, y = torch.randn(7, 4, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
    backend = KFOCBackend(model, "regression")
    _, kron = backend.kron(X, y, N=7)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    dense = dense_ggn_blocks(model, X, "regression")
    for name, factors in zip(names, kron.kfacs):
        if name.startswith("1."):
            torch.testing.assert_close(factors[0], dense[name], rtol=1e-9, atol=1e-12)


class Scaled(nn.Module):
    """A module no kind describes, with a parameter too large for per-sample gradients."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1100, 1000))

    def forward(self, x):
        return x * self.scale.mean()


def test_too_large_parameter_rejected_at_construction():
    model = nn.Sequential(nn.Linear(3, 4), Scaled(), nn.Linear(4, 2))
    with pytest.raises(NotImplementedError, match=r"'1' \(Scaled\).*\(1100, 1000\)"):
        KFOCBackend(model, "regression")
    model[1].scale.requires_grad_(False)
    KFOCBackend(model, "regression")  # frozen: fine
    table = nn.Sequential(nn.Embedding(5000, 256), nn.Flatten(), nn.Linear(256, 2))
    KFOCBackend(table, "regression")  # a large table: diag(l) ⊗ R (tests/test_vocabulary.py)


def test_default_last_layer_kron_with_backend(problem):
    """``Laplace(model, lik, hessian_structure="kron", backend=KFOCBackend)``: last layer."""
    from laplace import Laplace

    from kfoc_backpack import KFOCLLLaplace

    la = Laplace(problem.fresh_model(), problem.likelihood, backend=KFOCBackend)
    la.fit(problem.loader())
    ours = KFOCLLLaplace(problem.fresh_model(), problem.likelihood, aggregation="approx")
    ours.fit(problem.loader())
    for mine, other in zip(ours.H_facs.kfacs, la.H_facs.kfacs):
        for a, b in zip(mine, other):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-10)
    assert finite_all(la(problem.X[:3], pred_type="glm"))


def finite_all(out):
    return all(torch.isfinite(o).all() for o in (out if isinstance(out, tuple) else (out,)))
