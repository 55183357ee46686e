"""KFOCLaplace and KFOCLLLaplace: drop-ins for KronLaplace and KronLLLaplace."""

from __future__ import annotations

import copy

import pytest
import torch
from laplace import KronLaplace, KronLLLaplace, Laplace, marglik_training
from laplace.curvature import AsdlGGN, BackPackEF, BackPackGGN
from laplace_helpers import (
    NUM_DATA,
    dense_ggn_blocks,
    make_problem,
    optimal_error,
    rel_error,
    single_thread,  # noqa: F401 (autouse fixture)
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kfoc_backpack import KFOCBackend, KFOCEFBackend, KFOCLaplace, KFOCLLLaplace

SUBSETS = {"all": KFOCLaplace, "last_layer": KFOCLLLaplace}
LINKS = ["probit", "mc", "bridge", "bridge_norm"]


def make(problem, subset, **kwargs):
    return Laplace(
        problem.fresh_model(),
        problem.likelihood,
        subset_of_weights=subset,
        hessian_structure="kfoc",
        **kwargs,
    )


@pytest.fixture(scope="module", params=["classification", "regression"])
def problem(request):
    return make_problem("mlp", request.param)


@pytest.fixture(scope="module", params=list(SUBSETS))
def fitted(request, problem):
    la = make(problem, request.param)
    la.fit(problem.loader())
    return problem, request.param, la


def refit(problem, subset, **kwargs):
    """A freshly fitted copy (deep copies of last-layer Laplace share feature hooks)."""
    la = make(problem, subset, **kwargs)
    la.fit(problem.loader())
    return la


def finite(out):
    outs = out if isinstance(out, tuple) else (out,)
    return all(torch.isfinite(o).all() for o in outs)


# --------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------


def test_laplace_factory_finds_classes(problem):
    for subset, cls in SUBSETS.items():
        la = make(problem, subset)
        assert type(la) is cls
        assert isinstance(la, KronLLLaplace if subset == "last_layer" else KronLaplace)
    # laplace's own classes are not shadowed
    plain = Laplace(problem.fresh_model(), problem.likelihood, "all", "kron")
    assert type(plain) is KronLaplace
    assert type(Laplace(problem.fresh_model(), problem.likelihood)) is KronLLLaplace


# --------------------------------------------------------------------------------------
# Drop-in features
# --------------------------------------------------------------------------------------


def test_glm_predictive(fitted):
    problem, subset, la = fitted
    X = problem.X[:5]
    if problem.likelihood == "classification":
        for link in LINKS:
            probs = la(X, pred_type="glm", link_approx=link, n_samples=20)
            assert probs.shape == (5, 3) and finite(probs), link
            torch.testing.assert_close(probs.sum(-1), torch.ones(5, dtype=probs.dtype))
    else:
        mean, var = la(X, pred_type="glm")
        assert mean.shape == (5, 2) and var.shape == (5, 2, 2) and finite((mean, var))
        assert torch.all(torch.linalg.eigvalsh(var) > 0)
        mean_j, cov = la(X, pred_type="glm", joint=True)
        assert cov.shape == (10, 10) and finite(cov)
        torch.testing.assert_close(cov.diagonal(), var.diagonal(dim1=1, dim2=2).flatten())


def test_nn_predictive_and_sample(fitted):
    problem, _, la = fitted
    X = problem.X[:5]
    out = la(X, pred_type="nn", link_approx="mc", n_samples=10)
    assert finite(out)
    gen = torch.Generator().manual_seed(0)
    samples = la.sample(n_samples=200, generator=gen)
    assert samples.shape == (200, la.n_params) and finite(samples)
    assert (samples.mean(0) - la.mean).abs().max() < 5 * samples.std(0).max() / 200**0.5 + 1e-8
    fs = la.functional_samples(X, pred_type="glm", n_samples=4)
    assert fs.shape[:2] == (4, 5) and finite(fs)


def test_log_marginal_likelihood_and_priors(fitted):
    problem, subset, _ = fitted
    la = refit(problem, subset)
    lml = la.log_marginal_likelihood()
    assert torch.isfinite(lml)
    prec = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    value = la.log_marginal_likelihood(prior_precision=prec)
    value.backward()
    assert torch.isfinite(prec.grad)
    layerwise = torch.linspace(0.5, 2.0, la.n_layers, dtype=torch.float64)
    assert torch.isfinite(la.log_marginal_likelihood(prior_precision=layerwise))
    assert finite(la(problem.X[:3], pred_type="glm"))  # predictive with per-layer prior
    if problem.likelihood == "regression":
        sigma = torch.tensor(0.7, dtype=torch.float64)
        assert torch.isfinite(la.log_marginal_likelihood(layerwise, sigma))


@pytest.mark.parametrize("structure", ["scalar", "layerwise"])
def test_optimize_prior_precision_marglik(fitted, structure):
    problem, subset, _ = fitted
    la = refit(problem, subset)
    before = la.log_marginal_likelihood().item()
    la.optimize_prior_precision(
        pred_type="glm", method="marglik", n_steps=30, prior_structure=structure
    )
    assert la.prior_precision.numel() == (1 if structure == "scalar" else la.n_layers)
    assert la.log_marginal_likelihood().item() >= before - 1e-6


def test_optimize_prior_precision_gridsearch(fitted):
    problem, subset, _ = fitted
    la = refit(problem, subset)
    val_loader = problem.loader([12, 11])
    la.optimize_prior_precision(
        pred_type="glm",
        method="gridsearch",
        val_loader=val_loader,
        grid_size=5,
        link_approx="probit",
    )
    assert la.prior_precision.numel() == 1 and torch.isfinite(la.prior_precision).all()


def test_state_dict_roundtrip(fitted):
    problem, subset, la = fitted
    state = la.state_dict()
    assert state["aggregation"] == la.aggregation
    other = make(problem, subset)
    other.load_state_dict(state)
    torch.testing.assert_close(other.log_marginal_likelihood(), la.log_marginal_likelihood())
    out_a, out_b = la(problem.X[:4]), other(problem.X[:4])
    for a, b in zip(
        out_a if isinstance(out_a, tuple) else (out_a,),
        out_b if isinstance(out_b, tuple) else (out_b,),
    ):
        torch.testing.assert_close(a, b)
    mismatch = make(problem, subset, aggregation="approx")
    with pytest.warns(UserWarning, match="aggregation"):
        mismatch.load_state_dict(state)
    with pytest.raises(ValueError, match="wrong Laplace type"):
        Laplace(problem.fresh_model(), problem.likelihood, subset, "kron").load_state_dict(state)


@pytest.mark.parametrize("subset", list(SUBSETS))
def test_damping_kept(problem, subset):
    undamped = make(problem, subset)
    damped = make(problem, subset, damping=True)
    assert damped.damping is True
    for la in (undamped, damped):
        la.fit(problem.loader())
    assert damped.H.damping is True
    assert damped.log_marginal_likelihood() != undamped.log_marginal_likelihood()
    # laplace-torch's own KronLLLaplace drops it (the bug KFOCLLLaplace avoids)
    if subset == "last_layer":
        assert (
            KronLLLaplace(problem.fresh_model(), problem.likelihood, damping=True).damping is False
        )


def test_online_fit_matches_kronlaplace_for_approx(problem):
    """fit(override=False): "approx" continues like KronLaplace with KFOCBackend."""
    first, second = problem.loader([NUM_DATA]), problem.loader([5, 9, 9])
    ours = make(problem, "all", aggregation="approx")
    theirs = KronLaplace(problem.fresh_model(), problem.likelihood, backend=KFOCBackend)
    for la in (ours, theirs):
        la.fit(first)
        la.fit(second, override=False)
    assert ours.n_data == theirs.n_data == 2 * NUM_DATA
    for mine, other in zip(ours.H_facs.kfacs, theirs.H_facs.kfacs):
        for a, b in zip(mine, other):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(ours.loss, theirs.loss)


def test_online_fit_last_layer_refused_like_kronlllaplace(problem):
    la = make(problem, "last_layer")
    la.fit(problem.loader())
    with pytest.raises(ValueError, match="override=False"):
        la.fit(problem.loader(), override=False)


@pytest.mark.parametrize("subset", list(SUBSETS))
@pytest.mark.parametrize("aggregation", ["running", "optimal"])
def test_progress_bar(problem, capsys, aggregation, subset):
    la = make(problem, subset, aggregation=aggregation)
    la.fit(problem.loader(), progress_bar=True)
    err = capsys.readouterr().err
    assert ("Computing Hessian" if aggregation == "running" else "K-FOC optimal") in err


def test_marglik_training():
    problem = make_problem("mlp", "classification")
    loader = problem.loader([12, 11])
    la, model, margliks, losses = marglik_training(
        problem.fresh_model(),
        loader,
        likelihood="classification",
        hessian_structure="kfoc",
        backend=KFOCBackend,
        n_epochs=3,
        n_hypersteps=2,
    )
    assert (
        type(la) is KFOCLaplace
        and len(margliks) == 6
        and all(torch.isfinite(torch.tensor(margliks)))
    )
    # with marglik_training's default backend (AsdlGGN) K-FOC still uses KFOCBackend
    with pytest.warns(UserWarning, match="replaced by KFOCBackend"):
        la, *_ = marglik_training(
            problem.fresh_model(), loader, hessian_structure="kfoc", n_epochs=1, n_hypersteps=1
        )
    assert la._backend_cls is KFOCBackend


# --------------------------------------------------------------------------------------
# Agreement with KronLaplace where the factors coincide
# --------------------------------------------------------------------------------------


def _assert_same_posterior(ours, theirs, X, damping):
    for mine, other in zip(ours.H_facs.kfacs, theirs.H_facs.kfacs):
        for a, b in zip(mine, other):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    if damping:
        # laplace-torch 0.3 drops damping in KronDecomposed arithmetic: damp by hand
        precision = theirs.H * theirs._H_factor + theirs.prior_precision
        precision.damping = True
        torch.testing.assert_close(
            ours.posterior_precision.to_matrix(), precision.to_matrix(), rtol=1e-8, atol=1e-10
        )
        log_det_ratio = precision.logdet() - theirs.log_det_prior_precision
        expected = theirs.log_likelihood - 0.5 * (log_det_ratio + theirs.scatter)
        torch.testing.assert_close(ours.log_marginal_likelihood(), expected)
        undamped = theirs.posterior_precision.to_matrix()
        assert not torch.allclose(ours.posterior_precision.to_matrix(), undamped)
        return
    torch.testing.assert_close(ours.log_marginal_likelihood(), theirs.log_marginal_likelihood())
    for a, b in zip(ours(X, pred_type="glm"), theirs(X, pred_type="glm")):
        torch.testing.assert_close(a, b)
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    torch.testing.assert_close(ours.sample(5, gen_a), theirs.sample(5, gen_b))


@pytest.mark.parametrize("aggregation", ["approx", "running", "optimal"])
@pytest.mark.parametrize("damping", [False, True])
def test_agrees_with_kronlaplace_on_kronecker_blocks(aggregation, damping):
    """A regression network's linear output layer has an exactly Kronecker GGN block."""
    problem = make_problem("mlp", "regression")
    model = nn.Sequential(nn.Linear(4, 2)).double()
    prior = torch.tensor([0.5, 2.0], dtype=torch.float64)  # per layer
    kwargs = {"prior_precision": prior, "damping": damping, "sigma_noise": 0.8}
    ours = KFOCLaplace(copy.deepcopy(model), "regression", aggregation=aggregation, **kwargs)
    theirs = KronLaplace(copy.deepcopy(model), "regression", backend=BackPackGGN, **kwargs)
    for la in (ours, theirs):
        la.fit(problem.loader())
    _assert_same_posterior(ours, theirs, problem.X[:4], damping)
    # last layer of a deeper regression network
    ours = make(problem, "last_layer", aggregation=aggregation, damping=damping)
    theirs = Laplace(problem.fresh_model(), "regression", "last_layer", "kron", backend=BackPackGGN)
    theirs.damping = damping  # KronLLLaplace drops the constructor argument
    for la in (ours, theirs):
        la.fit(problem.loader())
    _assert_same_posterior(ours, theirs, problem.X[:4], damping)


# --------------------------------------------------------------------------------------
# Models: frozen parameters, convolutions
# --------------------------------------------------------------------------------------


def test_frozen_backbone_last_layer_and_all(problem):
    model = problem.fresh_model()
    for p in model[0].parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="BackPACK"):
        Laplace(copy.deepcopy(model), problem.likelihood, "last_layer", "kron", backend=BackPackGGN)
    for subset in SUBSETS:
        la = Laplace(copy.deepcopy(model), problem.likelihood, subset, "kfoc")
        la.fit(problem.loader())
        assert finite(la(problem.X[:3], pred_type="glm"))
        assert torch.isfinite(la.log_marginal_likelihood())
    assert la.n_params == model[-1].weight.numel() + model[-1].bias.numel()


def test_conv1d_conv3d_models():
    torch.manual_seed(0)
    models = {
        "conv1d": (
            nn.Sequential(nn.Conv1d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(16, 3)),
            (1, 10),
        ),
        "conv3d": (
            nn.Sequential(nn.Conv3d(1, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(16, 3)),
            (1, 3, 3, 3),
        ),
    }
    for model, shape in models.values():
        model = model.double()
        X = torch.randn(11, *shape, dtype=torch.float64)
        y = torch.randint(0, 3, (11,))
        loader = DataLoader(TensorDataset(X, y), batch_size=4)
        la = KFOCLaplace(copy.deepcopy(model), "classification", aggregation="optimal", tol=1e-10)
        la.fit(loader)
        blocks = dense_ggn_blocks(model, X, "classification")
        weight = model[0].weight
        L, R = la.H_facs.kfacs[0]
        best = optimal_error(blocks["0.weight"], weight.shape[0], weight[0].numel())
        assert rel_error(blocks["0.weight"], L, R) == pytest.approx(best, abs=1e-6)
        assert finite(la(X[:2]))


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


class CountingModel(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x["input_ids"] if isinstance(x, dict) else x)


@pytest.mark.parametrize("subset", list(SUBSETS))
def test_dict_batches_fit_like_tensor_batches(problem, subset):
    """Dict-like batches (``dict_key_x``/``dict_key_y``) give the tensor batches' fit."""
    kwargs = {"last_layer_name": "inner.4"} if subset == "last_layer" else {}
    model = CountingModel(problem.fresh_model())
    la = Laplace(model, problem.likelihood, subset, "kfoc", **kwargs)
    loader = [{"input_ids": X, "labels": y} for X, y in problem.loader()]
    la.fit(loader)
    ref = Laplace(
        CountingModel(problem.fresh_model()), problem.likelihood, subset, "kfoc", **kwargs
    )
    ref.fit(problem.loader())
    for mine, other in zip(la.H_facs.kfacs, ref.H_facs.kfacs):
        for a, b in zip(mine, other):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert la.n_data == NUM_DATA


def test_too_large_parameter_rejected_at_construction(problem):
    embedding = nn.Sequential(nn.Linear(4, 6), nn.Unflatten(1, (1, 6)))
    model = nn.Sequential(embedding, nn.Flatten(), nn.Linear(6, 3)).double()
    model[0].table = nn.Parameter(torch.zeros(2000, 600, dtype=torch.float64))  # unused here
    with pytest.raises(
        NotImplementedError, match=r"(?s)\(2000, 600\) parameter 'table'.*last_layer"
    ):
        Laplace(model, "classification", "all", "kfoc")
    # last-layer Laplace differentiates the last layer only: the backbone may have it
    la = Laplace(model, "classification", "last_layer", "kfoc")
    X, y = problem.X, torch.randint(0, 3, (NUM_DATA,))
    la.fit(DataLoader(TensorDataset(X, y), batch_size=8))
    assert torch.isfinite(la.log_marginal_likelihood())


def test_batchnorm_gets_its_exact_block_in_eval_mode(problem):
    """laplace-torch's ``fit`` puts the model in eval mode: BatchNorm has per-sample gradients."""
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)).double()
    la = Laplace(model, "classification", "all", "kfoc")
    X, y = problem.X, torch.randint(0, 3, (NUM_DATA,))
    la.fit(DataLoader(TensorDataset(X, y), batch_size=8))
    assert len(la.H_facs.kfacs) == 6 and torch.isfinite(la.log_marginal_likelihood())


def test_unknown_aggregation_and_backends(problem):
    for subset in SUBSETS:
        with pytest.raises(ValueError, match="aggregation 'fast'.*'approx', 'running', 'optimal'"):
            make(problem, subset, aggregation="fast")
        with pytest.warns(UserWarning, match="replaced by KFOCEFBackend"):
            la = make(problem, subset, backend=BackPackEF)
        assert la._backend_cls is KFOCEFBackend
        with pytest.warns(UserWarning, match="replaced by KFOCBackend"):
            la = make(problem, subset, backend=AsdlGGN)
        assert la._backend_cls is KFOCBackend


@pytest.mark.parametrize("subset", list(SUBSETS))
def test_stochastic_fisher_all_aggregations(subset):
    problem = make_problem("cnn", "classification")
    for aggregation in ("approx", "running", "optimal"):
        fits = []
        for _ in range(2):
            torch.manual_seed(5)
            la = make(problem, subset, aggregation=aggregation, backend_kwargs={"stochastic": True})
            la.fit(problem.loader())
            fits.append(la)
        assert torch.isfinite(fits[0].log_marginal_likelihood())
        for mine, other in zip(fits[0].H_facs.kfacs, fits[1].H_facs.kfacs):
            for a, b in zip(mine, other):
                torch.testing.assert_close(a, b)  # reproducible under torch.manual_seed


def test_optimal_streams_when_terms_do_not_fit():
    problem = make_problem("cnn", "regression")
    stored = make(problem, "all", aggregation="optimal", tol=1e-10, max_passes=500)
    streamed = make(problem, "all", aggregation="optimal", tol=1e-10, max_passes=500, max_memory=1)
    for la in (stored, streamed):
        la.fit(problem.loader())
    for mine, other in zip(stored.H_facs.kfacs, streamed.H_facs.kfacs):
        for a, b in zip(mine, other):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)


def test_enable_backprop_through_predictive():
    problem = make_problem("mlp", "regression")
    for subset in SUBSETS:
        la = make(problem, subset, enable_backprop=True)
        la.fit(problem.loader())
        x = problem.X[:3].clone().requires_grad_(True)
        mean, var = la(x, pred_type="glm")
        (mean.sum() + var.sum()).backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.norm() > 0


def test_loader_without_dataset():
    problem = make_problem("mlp", "classification")
    la = make(problem, "all")
    la.fit(list(problem.loader()))
    assert la.n_data == NUM_DATA
