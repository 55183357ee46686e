"""The GLM predictive without the Jacobian, against laplace-torch's Jacobian route and dense.

Every all-weights class computes ``J P⁻¹ Jᵀ`` a parameter at a time
(``kfoc_backpack.laplace.predictive``). Ground truth: laplace-torch's own route (its
backend's Jacobians through ``functional_variance``/``functional_covariance``) and the
dense posterior covariance of the same blocks with ``torch.func`` Jacobians, in float64,
on an MLP, a strided convolution with BatchNorm in eval mode, a grouped convolution, a
residual network and a transformer block; classification and regression.
"""

from __future__ import annotations

import copy

import pytest
import torch
from laplace import Laplace
from laplace_helpers import DTYPE, single_thread  # noqa: F401 (autouse fixture)
from reach_models import MODELS, input_shape
from torch import nn
from torch.func import functional_call, jacrev

STRUCTURES = ("kfoc", "kfac", "ekfoc", "ekfac")


def build(arch: str, likelihood: str):
    torch.manual_seed(0)
    out = 3 if likelihood == "classification" else 2
    if arch == "bn_cnn":
        model = nn.Sequential(
            nn.Conv2d(2, 4, 3, stride=2, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, groups=2, padding=1),
            nn.Flatten(),
            nn.Linear(4 * 3 * 3, out),
        )
        for p in model[1].parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            model[1].running_mean.uniform_(-0.5, 0.5)
            model[1].running_var.uniform_(0.5, 1.5)
        shape = (2, 6, 6)
    else:
        model = MODELS[arch](outputs=out)
        shape = input_shape(arch)
    model = model.to(DTYPE).eval()
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(12, *shape, generator=gen, dtype=DTYPE)
    if likelihood == "classification":
        y = torch.randint(0, out, (12,), generator=gen)
    else:
        y = torch.randn(12, out, generator=gen, dtype=DTYPE)
    return model, X, y


def fitted(structure, model, likelihood, X, y):
    la = Laplace(copy.deepcopy(model), likelihood, "all", structure, prior_precision=0.8)
    la.fit([(X[:7], y[:7]), (X[7:], y[7:])])
    return la


def dense_covariance(la, model, X):
    """``J (H·factor + P₀)⁻¹ Jᵀ`` with the dense posterior and ``torch.func`` Jacobians."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())

    def output(theta):
        return functional_call(model, {**theta, **frozen, **buffers}, (X,))

    jac = jacrev(output)(params)  # {name: [N, C, *shape]}
    J = torch.cat([jac[n].flatten(start_dim=2) for n in params], dim=2)  # [N, C, P]
    covariance = la.posterior_precision.to_matrix(exponent=-1)
    return torch.einsum("ncp,pq,ndq->ncd", J, covariance, J), J


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("arch", ["mlp", "bn_cnn", "residual", "transformer"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_output_covariance_is_dense_and_laplace_torchs(structure, arch, likelihood):
    model, X, y = build(arch, likelihood)
    la = fitted(structure, model, likelihood, X, y)
    f_mu, f_var = la._glm_predictive_distribution(X[:5])
    dense, J = dense_covariance(la, model, X[:5])
    torch.testing.assert_close(f_var, dense, rtol=1e-9, atol=1e-12)
    Js, f_theirs = la.backend.jacobians(X[:5])
    torch.testing.assert_close(Js, J)  # laplace-torch's Jacobian is the one we compare with
    torch.testing.assert_close(f_var, la.functional_variance(Js), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(f_mu, f_theirs)
    if likelihood == "classification":
        probs = la(X[:5], pred_type="glm", link_approx="probit")
        kappa = 1 / torch.sqrt(1 + torch.pi / 8 * f_var.diagonal(dim1=-2, dim2=-1))
        torch.testing.assert_close(probs, torch.softmax(kappa * f_mu, -1))
    else:
        mean, var = la(X[:5], pred_type="glm", joint=True)
        torch.testing.assert_close(mean, f_theirs.flatten())  # laplace-torch's joint layout
        torch.testing.assert_close(var, la.functional_covariance(Js), rtol=1e-9, atol=1e-12)
        _, marginal = la(X[:5], pred_type="glm", diagonal_output=True)
        torch.testing.assert_close(marginal, dense.diagonal(dim1=-2, dim2=-1))


def test_chunks_of_inputs_give_the_same_covariance(monkeypatch):
    from kfoc_backpack.laplace import predictive

    model, X, y = build("bn_cnn", "classification")
    la = fitted("ekfoc", model, "classification", X, y)
    whole = la._glm_predictive_distribution(X)[1]
    monkeypatch.setattr(predictive, "CHUNK_ELEMENTS", 1)  # one input at a time
    torch.testing.assert_close(la._glm_predictive_distribution(X)[1], whole)


def test_backprop_through_the_predictive_takes_laplace_torchs_route():
    model, X, y = build("mlp", "regression")
    la = Laplace(copy.deepcopy(model), "regression", "all", "kfoc", enable_backprop=True)
    la.fit([(X, y)])
    inputs = X[:3].clone().requires_grad_(True)
    mean, var = la(inputs, pred_type="glm")
    var.sum().backward()
    assert inputs.grad is not None and torch.isfinite(inputs.grad).all()


def test_samples_and_last_layer_use_the_same_covariance():
    model, X, y = build("mlp", "classification")
    la = fitted("kfoc", model, "classification", X, y)
    samples = la.predictive_samples(X[:4], pred_type="glm", n_samples=7)
    assert samples.shape == (7, 4, 3)
    assert torch.allclose(samples.sum(-1), torch.ones(7, 4, dtype=DTYPE))
    last = Laplace(copy.deepcopy(model), "classification", "last_layer", "kfoc")
    last.fit([(X, y)])
    probs = last(X[:4], pred_type="glm")  # laplace-torch's own last-layer route
    assert torch.allclose(probs.sum(-1), torch.ones(4, dtype=DTYPE))
