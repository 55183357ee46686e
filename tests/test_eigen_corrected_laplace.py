"""``hessian_structure="ekfoc"``/``"ekfac"``: the eigenvalue-corrected Laplace posteriors.

Ground truth is independent of the library: dense per-parameter curvature blocks from
``torch.func`` (``laplace_helpers.dense_blocks``, laplace-torch's scaling) on MLPs, a
strided and dilated CNN, a residual model and a token ``Linear``, over uneven batches in
float64; the posterior is assembled densely from the fitted bases and eigenvalues with
``torch.kron`` and compared with every laplace-torch method on it.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from laplace import Laplace
from laplace_helpers import (
    DTYPE,
    NUM_OUTPUTS,
    dense_blocks,
    mc_draws,
    neighbour,
    single_thread,
)
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from kfoc_backpack.blocks import EigenCorrected
from kfoc_backpack.laplace import (
    BlockDecomposed,
    BlockLaplace,
    EKFACLaplace,
    EKFACLLLaplace,
    EKFOCLaplace,
    EKFOCLLLaplace,
    KFOCLaplace,
)

__all__ = ["single_thread"]

STRUCTURES = ("ekfoc", "ekfac")
BATCHES = [7, 3, 9, 4]


class Residual(nn.Module):
    """``h = tanh(W₁x); h + tanh(W₂h)``, then a readout: a residual sum."""

    def __init__(self, out: int):
        super().__init__()
        self.inp, self.block, self.out = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, out)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        return self.out(h + torch.tanh(self.block(h)))


class Tokens(nn.Module):
    """A ``Linear`` on each of 3 tokens (shared weight), mean over tokens, readout."""

    def __init__(self, out: int):
        super().__init__()
        self.embed, self.out = nn.Linear(4, 5), nn.Linear(5, out)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.embed(x)).mean(1))


def build(arch: str, likelihood: str, seed: int = 0, num: int = sum(BATCHES)):
    """``(model, X, y)`` for ``arch`` in float64."""
    out = NUM_OUTPUTS[likelihood]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if arch == "mlp":
        model, shape = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, out)), (4,)
    elif arch == "cnn":  # strided, padded, dilated
        model = nn.Sequential(
            nn.Conv2d(1, 3, 3, stride=2, padding=1),
            nn.Tanh(),
            nn.Conv2d(3, 2, 2, dilation=2),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(8, out),
        )
        shape = (1, 8, 8)
    elif arch == "residual":
        model, shape = Residual(out), (4,)
    else:
        model, shape = Tokens(out), (3, 4)
    X = torch.randn(num, *shape, generator=gen, dtype=DTYPE)
    if likelihood == "classification":
        y = torch.randint(0, out, (num,), generator=gen)
    else:
        y = torch.randn(num, out, generator=gen, dtype=DTYPE)
    return model.to(DTYPE), X, y


def loader(X: Tensor, y: Tensor, sizes=BATCHES) -> DataLoader:
    batches, start = [], 0
    for size in sizes:
        batches.append(list(range(start, start + size)))
        start += size
    return DataLoader(TensorDataset(X, y), batch_sampler=batches)


def fit(structure, model, likelihood, X, y, curvature="ggn", seed=0, subset="all", **kwargs):
    """A fitted eigenvalue-corrected Laplace (MC labels under ``torch.manual_seed(seed)``)."""
    backend_kwargs = {"stochastic": True} if curvature == "mc" else None
    if curvature == "ef":
        from laplace.curvature import CurvlinopsEF

        kwargs["backend"] = CurvlinopsEF
    with pytest.warns(UserWarning) if curvature == "ef" else _nothing():
        la = Laplace(
            copy.deepcopy(model),
            likelihood,
            subset,
            structure,
            backend_kwargs=backend_kwargs,
            **kwargs,
        )
    batches = list(loader(X, y))  # a DataLoader's iter() would draw from the seed too
    torch.manual_seed(seed)
    la.fit(batches)
    return la


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


def truth(model, likelihood, X, y, curvature, seed=0) -> dict[str, Tensor]:
    """Dense blocks; for ``"mc"`` under the labels the fit drew (base seed, then per batch)."""
    draws = None
    if curvature == "mc":
        torch.manual_seed(seed)
        base = int(torch.randint(0, 2**31 - 1, ()).item())
        parts, start = [], 0
        for index, size in enumerate(BATCHES):
            with torch.no_grad():
                f = model(X[start : start + size])
            parts.append(mc_draws(f, likelihood, base + index))
            start += size
        draws = torch.cat(parts)
    return dense_blocks(model, X, y, likelihood, curvature, draws)


def dense_precision(la, prior: float | Tensor = 0.0) -> Tensor:
    """``H + prior`` assembled with ``torch.kron`` from ``la.H``'s bases and eigenvalues."""
    blocks = []
    for index, (vectors, values) in enumerate(zip(la.H.eigenvectors, la.H.eigenvalues)):
        basis = vectors[0] if len(vectors) == 1 else torch.kron(*vectors)
        delta = prior[index] if isinstance(prior, Tensor) and prior.ndim else prior
        blocks.append((basis * (values[0].flatten() + delta)) @ basis.T)
    return torch.block_diag(*blocks)


# --------------------------------------------------------------------------------------
# The corrected blocks against the dense curvature
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("curvature", ["ggn", "mc", "ef"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("arch", ["mlp", "cnn", "residual", "tokens"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_blocks_are_the_dense_diagonal_in_the_basis(structure, arch, likelihood, curvature):
    model, X, y = build(arch, likelihood)
    la = fit(structure, model, likelihood, X, y, curvature)
    blocks = truth(model, likelihood, X, y, curvature)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert isinstance(la.H, BlockDecomposed)
    for (name, param), vectors, values, factors in zip(
        params, la.H.eigenvectors, la.H.eigenvalues, la.H_facs.kfacs
    ):
        F = blocks[name]
        if param.dim() == 1:  # biases exact
            basis = vectors[0]
            torch.testing.assert_close((basis * values[0]) @ basis.T, F, rtol=1e-8, atol=1e-10)
            continue
        q_left, q_right = vectors
        basis = torch.kron(q_left, q_right)
        expected = torch.diagonal(basis.T @ F @ basis).reshape(values[0].shape)
        torch.testing.assert_close(values[0], expected, rtol=1e-8, atol=1e-10 * F.norm())
        assert values[0].sum().item() == pytest.approx(torch.trace(F).item(), rel=1e-10)
        corrected = (basis * values[0].flatten()) @ basis.T
        kron = torch.kron(*factors)
        assert (F - corrected).norm() <= (F - kron).norm() + 1e-12 * F.norm(), name
        # the basis is the eigenbasis of H_facs' factors
        for q, factor in zip(vectors, factors):
            rotated = q.T @ factor @ q
            off = rotated - torch.diag(torch.diagonal(rotated))
            assert off.norm() <= 1e-9 * factor.norm()


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_ekfoc_basis_is_kfocs_and_ekfac_basis_is_kfacs(arch):
    """ekfoc keeps ``"kfoc"``'s factors; ekfac's basis diagonalises laplace-torch's K-FAC."""
    model, X, y = build(arch, "classification")
    ekfoc = fit("ekfoc", model, "classification", X, y)
    kfoc = fit("kfoc", model, "classification", X, y)
    for a, b in zip(ekfoc.H_facs.kfacs, kfoc.H_facs.kfacs):
        for x, z in zip(a, b):
            torch.testing.assert_close(x, z)
    ekfac = fit("ekfac", model, "classification", X, y)
    kron = Laplace(copy.deepcopy(model), "classification", "all", "kron")  # curvlinops K-FAC
    kron.fit(loader(X, y))
    for vectors, factors in zip(ekfac.H.eigenvectors, kron.H_facs.kfacs):
        if len(vectors) == 1:
            continue
        for q, factor in zip(vectors, factors):
            rotated = q.T @ factor @ q
            off = rotated - torch.diag(torch.diagonal(rotated))
            assert off.norm() <= 1e-8 * factor.norm()
    products = [torch.kron(*f) for f in ekfac.H_facs.kfacs if len(f) == 2]
    references = [torch.kron(*f) for f in kron.H_facs.kfacs if len(f) == 2]
    for ours, theirs in zip(products, references):
        torch.testing.assert_close(ours, theirs, rtol=1e-8, atol=1e-10 * theirs.norm())


def test_ekfoc_is_closer_than_kfoc_and_ekfac_than_kfac():
    """Per weight: ‖F − EK‖ ≤ ‖F − L⊗R‖ for both bases, on a data set (several batches)."""
    model, X, y = build("residual", "classification", seed=3)
    blocks = truth(model, "classification", X, y, "ggn")
    for structure in STRUCTURES:
        la = fit(structure, model, "classification", X, y)
        names = [n for n, p in model.named_parameters() if p.dim() > 1]
        dense = {
            n: torch.kron(*v) @ torch.diag(s[0].flatten()) @ torch.kron(*v).T
            for n, v, s in zip(
                [n for n, _ in model.named_parameters()], la.H.eigenvectors, la.H.eigenvalues
            )
            if n in names
        }
        facs = dict(zip([n for n, _ in model.named_parameters()], la.H_facs.kfacs))
        for name in names:
            F = blocks[name]
            assert (F - dense[name]).norm() <= (F - torch.kron(*facs[name])).norm()


# --------------------------------------------------------------------------------------
# laplace-torch's methods against the dense posterior
# --------------------------------------------------------------------------------------


def jacobians(model: nn.Module, X: Tensor) -> Tensor:
    """``[N, C, P]`` Jacobians of the outputs w.r.t. the trainable parameters."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    jac = torch.func.jacrev(lambda p: torch.func.functional_call(model, p, (X,)))(params)
    return torch.cat([J.flatten(2) for J in jac.values()], 2)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_posterior_methods_match_the_dense_posterior(structure, arch, likelihood):
    model, X, y = build(arch, likelihood, seed=1)
    sigma = 0.7 if likelihood == "regression" else 1.0
    kwargs = {"sigma_noise": sigma} if likelihood == "regression" else {}
    la = fit(structure, model, likelihood, X, y, prior_precision=0.5, temperature=1.3, **kwargs)
    # laplace-torch: P = H / (σ² T) + P₀
    P = dense_precision(la, 0.0) / (sigma**2 * 1.3) + 0.5 * torch.eye(la.n_params, dtype=DTYPE)
    torch.testing.assert_close(la.posterior_precision.to_matrix(), P)
    cov = torch.linalg.inv(P)
    torch.testing.assert_close(la.posterior_covariance, cov, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(la.posterior_variance, torch.diagonal(cov), rtol=1e-6, atol=1e-12)
    logdet = torch.linalg.slogdet(P).logabsdet
    assert la.log_det_posterior_precision.item() == pytest.approx(logdet.item(), rel=1e-8)
    # marginal likelihood: log p(D|θ) − ½ (log det P − log det P₀ + δ‖θ − μ₀‖²)
    theta = la.mean
    expected = la.log_likelihood - 0.5 * (
        logdet - la.n_params * math.log(0.5) + 0.5 * theta @ theta
    )
    assert la.log_marginal_likelihood().item() == pytest.approx(expected.item(), rel=1e-8)
    # functional variance and the glm predictive
    Js = jacobians(la.model, X[:5])
    f_var = la.functional_variance(Js)
    torch.testing.assert_close(
        f_var, torch.einsum("ncp,pq,ndq->ncd", Js, cov, Js), rtol=1e-6, atol=1e-12
    )
    if likelihood == "regression":
        mean, var = la(X[:5], pred_type="glm")  # laplace-torch 0.3: the functional variance
        torch.testing.assert_close(var, f_var)
    else:
        probs = la(X[:5], pred_type="glm", link_approx="probit")
        kappa = 1 / torch.sqrt(1 + math.pi / 8 * torch.diagonal(f_var, dim1=1, dim2=2))
        with torch.no_grad():
            expected_probs = torch.softmax(kappa * la.model(X[:5]), -1)
        torch.testing.assert_close(probs, expected_probs, rtol=1e-6, atol=1e-10)
    # samples: mean + P^{-1/2} z, so the transform's square is the covariance
    root = la.posterior_precision.bmm(torch.eye(la.n_params, dtype=DTYPE), exponent=-0.5)
    torch.testing.assert_close(root @ root.T, cov, rtol=1e-6, atol=1e-12)
    draws = 20000
    samples = la.sample(draws, generator=torch.Generator().manual_seed(0))
    empirical = torch.cov(samples.T)
    var = torch.diagonal(cov)
    standard_error = ((torch.outer(var, var) + cov.square()) / draws).sqrt()
    assert ((empirical - cov).abs() <= 5 * standard_error).all()
    torch.testing.assert_close(
        samples.mean(0), la.mean, rtol=0, atol=5 * (var.max() / draws) ** 0.5
    )
    # the nn predictive runs on those samples
    nn_pred = la(X[:5], pred_type="nn", link_approx="mc", n_samples=50)
    out = nn_pred if likelihood == "classification" else nn_pred[0]
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("structure", STRUCTURES)
def test_layerwise_prior_and_prior_optimisation(structure):
    model, X, y = build("mlp", "classification", seed=2)
    la = fit(structure, model, "classification", X, y)
    prior = torch.tensor([0.3, 1.0, 2.0, 0.1], dtype=DTYPE)
    la.prior_precision = prior
    sizes = [p.numel() for p in model.parameters()]
    diag = torch.cat([v.expand(n) for v, n in zip(prior, sizes)])
    P = dense_precision(la) + torch.diag(diag)
    torch.testing.assert_close(la.posterior_precision.to_matrix(), P)
    assert la.log_det_posterior_precision.item() == pytest.approx(
        torch.linalg.slogdet(P).logabsdet.item(), rel=1e-8
    )
    # marglik, scalar and layer-wise: the marginal likelihood does not decrease
    for prior_structure in ("scalar", "layerwise"):
        la.prior_precision = 1.0
        before = la.log_marginal_likelihood().item()
        la.optimize_prior_precision(method="marglik", prior_structure=prior_structure, n_steps=50)
        assert torch.isfinite(la.prior_precision).all() and (la.prior_precision > 0).all()
        assert la.log_marginal_likelihood().item() >= before - 1e-9
    # grid search on a validation loader
    la.optimize_prior_precision(
        method="gridsearch", pred_type="glm", val_loader=loader(X, y), grid_size=5
    )
    assert la.prior_precision.numel() == 1 and la.prior_precision.item() > 0
    # a per-parameter prior cannot enter the eigenbasis: a clear error
    with pytest.raises(ValueError, match="scalar or per-layer"):
        la.prior_precision = torch.ones(la.n_params, dtype=DTYPE)
    with pytest.raises(ValueError, match="layerwise"):
        la.H + torch.ones(la.n_params, dtype=DTYPE)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_state_dict_round_trip(structure):
    model, X, y = build("cnn", "regression")
    la = fit(structure, model, "regression", X, y, sigma_noise=0.5)
    state = la.state_dict()
    kinds = ["corrected" if p.dim() > 1 else "dense" for p in model.parameters()]
    assert [entry["kind"] for entry in state["blocks"]] == kinds
    other = Laplace(copy.deepcopy(model), "regression", "all", structure, sigma_noise=0.5)
    other.load_state_dict(state)
    torch.testing.assert_close(
        other.posterior_precision.to_matrix(), la.posterior_precision.to_matrix()
    )
    kfoc = Laplace(copy.deepcopy(model), "regression", "all", "kfoc", sigma_noise=0.5)
    with pytest.raises(ValueError, match="Laplace type|corrected"):
        kfoc.load_state_dict(state)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_online_update_projects_the_earlier_eigenvalues(structure):
    """``fit(override=False)``: earlier ``S`` projected onto the new basis plus the new data's."""
    model, X, y = build("mlp", "regression", seed=4)
    first, second = slice(0, 10), slice(10, None)
    la = Laplace(copy.deepcopy(model), "regression", "all", structure)
    la.fit(loader(X[first], y[first], [6, 4]))
    old = [
        EigenCorrected(v[0], v[1], s[0]) if len(v) == 2 else None
        for v, s in zip(la.H.eigenvectors, la.H.eigenvalues)
    ]
    la.fit(loader(X[second], y[second], [9, 4]), override=False)
    assert la.n_data == len(X)
    blocks = dense_blocks(model, X, y, "regression", "ggn")
    new_only = dense_blocks(model, X[second], y[second], "regression", "ggn")
    names = [n for n, _ in model.named_parameters()]
    for name, vectors, values, earlier in zip(names, la.H.eigenvectors, la.H.eigenvalues, old):
        if earlier is None:  # biases: the sum of both data sets' exact blocks
            basis = vectors[0]
            torch.testing.assert_close((basis * values[0]) @ basis.T, blocks[name])
            continue
        basis = torch.kron(*vectors)
        fresh = torch.diagonal(basis.T @ new_only[name] @ basis).reshape(values[0].shape)
        expected = fresh + earlier.projected(EigenCorrected(*vectors, values[0]))
        torch.testing.assert_close(values[0], expected, rtol=1e-8, atol=1e-12)
        assert values[0].sum().item() == pytest.approx(blocks[name].trace().item(), rel=1e-10)


def test_projection_is_the_dense_diagonal_in_the_new_basis():
    gen = torch.Generator().manual_seed(0)
    q = [torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DTYPE)).Q for n in (3, 4, 3, 4)]
    old = EigenCorrected(q[0], q[1], torch.rand(3, 4, generator=gen, dtype=DTYPE))
    basis = torch.kron(q[2], q[3])
    expected = torch.diagonal(basis.T @ old.dense() @ basis).reshape(3, 4)
    torch.testing.assert_close(old.projected(EigenCorrected(q[2], q[3], old.diagonal)), expected)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_last_layer(structure, likelihood):
    model, X, y = build("mlp", likelihood, seed=5)
    la = fit(structure, model, likelihood, X, y, subset="last_layer")
    assert isinstance(la, EKFOCLLLaplace if structure == "ekfoc" else EKFACLLLaplace)
    blocks = truth(model, likelihood, X, y, "ggn")
    vectors, values = la.H.eigenvectors[0], la.H.eigenvalues[0]
    basis = torch.kron(*vectors)
    expected = torch.diagonal(basis.T @ blocks["2.weight"] @ basis).reshape(values[0].shape)
    torch.testing.assert_close(values[0], expected, rtol=1e-8, atol=1e-12)
    Js, _ = la.backend.last_layer_jacobians(X[:4])
    f_var = la.functional_variance(Js)
    cov = torch.linalg.inv(dense_precision(la, 1.0))
    torch.testing.assert_close(f_var, torch.einsum("ncp,pq,ndq->ncd", Js, cov, Js))


def test_float32_matches_float64():
    model, X, y = build("cnn", "classification", seed=6)
    la64 = fit("ekfoc", model, "classification", X, y)
    la32 = fit("ekfoc", model.float(), "classification", X.float(), y)
    P64 = la64.posterior_precision.to_matrix()
    P32 = la32.posterior_precision.to_matrix().double()
    assert (P32 - P64).norm() <= 1e-4 * P64.norm()
    assert la32.log_marginal_likelihood().item() == pytest.approx(
        la64.log_marginal_likelihood().item(), rel=1e-4
    )


def test_classes_are_registered_and_siblings():
    model, _, _ = build("mlp", "classification")
    for structure, cls in [("ekfoc", EKFOCLaplace), ("ekfac", EKFACLaplace)]:
        la = Laplace(copy.deepcopy(model), "classification", "all", structure)
        assert type(la) is cls and isinstance(la, BlockLaplace)
        assert not isinstance(la, KFOCLaplace)  # siblings, not subclasses
        assert la.approximation.structure == structure


def test_damping_and_aggregation_arguments_are_refused():
    model, _, _ = build("mlp", "classification")
    for structure in STRUCTURES:
        with pytest.raises(ValueError, match="damping=True"):
            Laplace(copy.deepcopy(model), "classification", "all", structure, damping=True)
    with pytest.raises(TypeError, match=r"EKFACLaplace: .*'aggregation'.*'ekfac' takes .* no arg"):
        Laplace(copy.deepcopy(model), "classification", "all", "ekfac", aggregation="optimal")
    la = Laplace(copy.deepcopy(model), "classification", "all", "ekfoc", aggregation="optimal")
    assert la.aggregation == "optimal"


@pytest.mark.parametrize("aggregation", ["approx", "running", "optimal"])
def test_every_aggregation_gives_a_trace_exact_correction(aggregation):
    model, X, y = build("tokens", "classification", seed=7)
    la = fit("ekfoc", model, "classification", X, y, aggregation=aggregation)
    blocks = truth(model, "classification", X, y, "ggn")
    names = [n for n, _ in model.named_parameters()]
    for name, values in zip(names, la.H.eigenvalues):
        if values[0].ndim == 2:
            assert values[0].sum().item() == pytest.approx(blocks[name].trace().item(), rel=1e-10)


@pytest.mark.parametrize(
    ("likelihood", "curvature"),
    [("classification", "ggn"), ("regression", "ggn"), ("classification", "mc")],
)
def test_ekfac_equals_curvlinops_ekfac(likelihood, curvature):
    """``ekfac`` on one batch against curvlinops 3's ``EKFACLinearOperator`` (weights).

    An MLP (one position per layer, where curvlinops' per-example correction is the
    exact one). The Monte-Carlo Fisher under the labels ``ŷ`` the fit drew is the
    empirical Fisher at ``ŷ``: curvlinops' ``"empirical"`` type on ``(X, ŷ)``.
    """
    curvlinops = neighbour("curvlinops", "EKFACLinearOperator")
    model, X, y = build("mlp", likelihood, seed=8, num=24)
    la = Laplace(
        copy.deepcopy(model),
        likelihood,
        "all",
        "ekfac",
        backend_kwargs={"stochastic": True} if curvature == "mc" else None,
    )
    torch.manual_seed(0)
    la.fit([(X, y)])
    fisher_type, targets = "type-2", y
    if curvature == "mc":
        torch.manual_seed(0)
        base = int(torch.randint(0, 2**31 - 1, ()).item())
        with torch.no_grad():
            targets = mc_draws(model(X), likelihood, base)
        fisher_type = "empirical"
    if likelihood == "regression":  # laplace-torch's GGN is half MSE(sum)'s
        lossfunc, scale = nn.MSELoss(reduction="sum"), 0.5
    else:
        lossfunc, scale = nn.CrossEntropyLoss(reduction="sum"), 1.0
    params = list(model.parameters())
    ekfac = curvlinops.EKFACLinearOperator(
        model, lossfunc, params, [(X, targets)], fisher_type=fisher_type, check_deterministic=False
    )
    dense = scale * (ekfac @ torch.eye(la.n_params, dtype=DTYPE))
    ours = la.H.to_matrix()
    offset = 0
    for param in model.parameters():
        size = param.numel()
        if param.dim() > 1:
            theirs = dense[offset : offset + size, offset : offset + size]
            mine = ours[offset : offset + size, offset : offset + size]
            torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-6 * theirs.abs().max())
        offset += size
