"""Influence scores against ``g_testᵀ (B + λI)⁻¹ g_train`` formed densely in float64.

Ground truth is independent of the package's gradient and preconditioning code: per-sample
gradients by ``torch.func`` (``vmap`` of ``grad`` of one input's loss or margin), each
structure's block ``B`` as a dense matrix (the fitted block's ``dense()``, or for the
exact GGN ``Σ_n J_nᵀ H_n J_n`` from ``torch.func`` Jacobians and loss Hessians), damping
from ``eigvalsh`` of that matrix, and ``torch.linalg.solve``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from laplace import Laplace
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev, vmap
from torch.utils.data import DataLoader, TensorDataset

import kfoc_backpack  # noqa: F401 - registers the structures
from kfoc_backpack.blocks import DenseBlock
from kfoc_backpack.influence import Damping, Influence, Measurement, Preconditioner
from kfoc_backpack.influence.measure import margin

DTYPE = torch.float64
NUM_TRAIN, NUM_TEST = 20, 6
STRUCTURES = ["kfoc", "ekfoc", "ekfac", "kfac", "kron"]


class TokenModel(nn.Module):
    """Token-shared ``Linear`` layers: ``[N, T, D]`` → mean over tokens → classes."""

    def __init__(self, width: int, hidden: int, outputs: int):
        super().__init__()
        self.embed = nn.Linear(width, hidden)
        self.mix = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, outputs)

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        return self.head(torch.tanh(self.mix(h)).mean(dim=1))


def make(kind: str, likelihood: str, seed: int = 0):
    """A model and its train/test data (float64)."""
    torch.manual_seed(seed)
    outputs = 3 if likelihood == "classification" else 2
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, outputs))
        shape = (4,)
    elif kind == "cnn":
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(3 * 4 * 4, outputs),
        )
        shape = (2, 8, 8)
    else:
        model = TokenModel(3, 5, outputs)
        shape = (4, 3)
    model = model.to(DTYPE)
    X = torch.randn(NUM_TRAIN + NUM_TEST, *shape, dtype=DTYPE)
    if likelihood == "classification":
        y = torch.randint(outputs, (NUM_TRAIN + NUM_TEST,))
    else:
        y = torch.randn(NUM_TRAIN + NUM_TEST, outputs, dtype=DTYPE)
    train = (X[:NUM_TRAIN], y[:NUM_TRAIN])
    test = (X[NUM_TRAIN:], y[NUM_TRAIN:])
    return model, train, test


def loader(data, batch_size: int) -> DataLoader:
    return DataLoader(TensorDataset(*data), batch_size=batch_size)


def lossfunc(likelihood: str) -> nn.Module:
    if likelihood == "classification":
        return nn.CrossEntropyLoss(reduction="sum")
    return nn.MSELoss(reduction="sum")


def per_sample_gradients(model, data, likelihood, measurement="loss"):
    """``[N, P]`` per-sample gradients by ``torch.func`` (all trainable parameters, in order)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    loss = lossfunc(likelihood)

    def value(p, x, y):
        out = functional_call(model, p, (x.unsqueeze(0),))
        if measurement == "margin":
            return margin(out, y.unsqueeze(0)).sum()
        return loss(out, y.unsqueeze(0))

    grads = vmap(grad(value), in_dims=(None, 0, 0))(params, *data)
    return torch.cat([g.reshape(len(data[0]), -1) for g in grads.values()], dim=1)


def dense_ggn(model, data, likelihood):
    """Mean over inputs of ``J_nᵀ H_n J_n`` over all parameters, by ``torch.func``."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    loss = lossfunc(likelihood)

    def out(p, x):
        return functional_call(model, p, (x.unsqueeze(0),))[0]

    jac = vmap(jacrev(out), in_dims=(None, 0))(params, data[0])
    J = torch.cat([j.reshape(*j.shape[:2], -1) for j in jac.values()], dim=2)  # [N, C, P]
    f = vmap(lambda x: out(params, x))(data[0])
    H = vmap(hessian(lambda o, y: loss(o.unsqueeze(0), y.unsqueeze(0))))(f, data[1])
    return torch.einsum("ncp,ncd,ndq->pq", J, H, J) / len(data[0])


def damped_inverse(blocks, damping=0.1):
    """Block diagonal of ``(B + λ)⁻¹``, ``λ = damping × mean eigenvalue`` of each block."""
    inverses = []
    for B in blocks:
        lam = damping * torch.linalg.eigvalsh(B).clamp(min=0).mean()
        inverses.append(torch.linalg.inv(B + lam * torch.eye(len(B), dtype=B.dtype)))
    return torch.block_diag(*inverses)


def fitted(model, train, likelihood, structure):
    la = Laplace(model, likelihood, subset_of_weights="all", hessian_structure=structure)
    la.fit(loader(train, 7))  # uneven last batch (20 = 7 + 7 + 6)
    return la


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("kind", ["mlp", "cnn", "tokens"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_pairwise_scores_equal_dense_scores(structure, kind, likelihood):
    model, train, test = make(kind, likelihood)
    la = fitted(model, train, likelihood, structure)
    measurement = "margin" if likelihood == "classification" else "loss"
    influence = Influence.from_laplace(la, measurement=measurement)
    scores = influence.pairwise(loader(train, 6), loader(test, 4))

    blocks = [torch.kron(*kfacs) if len(kfacs) == 2 else kfacs[0] for kfacs in la.H_facs.kfacs]
    if structure in ("ekfoc", "ekfac"):
        blocks = [block.dense() for block in la.H_facs.blocks]
    blocks = [b / la.n_data for b in blocks]
    g_train = per_sample_gradients(model, train, likelihood)
    g_test = per_sample_gradients(model, test, likelihood, measurement)
    expected = g_test @ damped_inverse(blocks) @ g_train.T
    assert scores.shape == (NUM_TEST, NUM_TRAIN)
    assert rel(scores, expected) < 1e-6


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("kind", ["mlp", "cnn", "tokens"])
def test_exact_and_identity_equal_dense_scores(kind, likelihood):
    model, train, test = make(kind, likelihood, seed=1)
    loss = lossfunc(likelihood)
    g_train = per_sample_gradients(model, train, likelihood)
    g_test = per_sample_gradients(model, test, likelihood)

    exact = Influence.exact(model, loss, loader(train, 7))
    G = dense_ggn(model, train, likelihood)
    expected = g_test @ damped_inverse([G]) @ g_train.T
    assert rel(exact.pairwise(loader(train, 5), loader(test, 6)), expected) < 1e-6

    identity = Influence(model, loss, Preconditioner.identity(model, damping=0.5))
    expected = g_test @ g_train.T / 1.5
    assert rel(identity.pairwise(loader(train, 20), loader(test, 1)), expected) < 1e-12


@pytest.mark.parametrize("structure", ["ekfoc", "kfac"])
def test_self_influence_is_the_diagonal_of_the_pairwise_scores(structure):
    model, train, _ = make("cnn", "classification", seed=2)
    la = fitted(model, train, "classification", structure)
    influence = Influence.from_laplace(la)
    pairwise = influence.pairwise(loader(train, 1), loader(train, 8))  # batch of one
    own = influence.self_influence(loader(train, 9))
    assert torch.allclose(own, pairwise.diagonal(), rtol=1e-9, atol=0)
    assert (own > 0).all()


def test_backpack_factors_and_absolute_damping():
    """BackPACK's ``KFOC`` savefields (``[L, R]``, ``[B]``), ``λ`` a number."""
    from backpack import backpack, extend

    from kfoc_backpack import KFOC

    model, train, test = make("mlp", "classification", seed=3)
    extended = extend(copy.deepcopy(model))
    loss = extend(lossfunc("classification"))
    with backpack(KFOC()):
        loss(extended(train[0]), train[1]).backward()
    factors = {name: p.kfoc for name, p in extended.named_parameters()}
    influence = Influence.from_factors(
        model, lossfunc("classification"), factors, damping=0.3, rule=Damping.ABSOLUTE
    )
    scores = influence.pairwise(loader(train, 20), loader(test, 6))
    blocks = [torch.kron(*f) if len(f) == 2 else f[0] for f in factors.values()]
    inverse = torch.block_diag(
        *[torch.linalg.inv(b + 0.3 * torch.eye(len(b), dtype=DTYPE)) for b in blocks]
    )
    g_train = per_sample_gradients(model, train, "classification")
    g_test = per_sample_gradients(model, test, "classification")
    assert rel(scores, g_test @ inverse @ g_train.T) < 1e-6
    with pytest.raises(ValueError, match="'0.weight'"):
        Influence.from_factors(model, loss, {"0.weight": [torch.eye(6)]})


def test_float32_scores_follow_float64():
    model, train, test = make("cnn", "classification", seed=4)
    la = fitted(model, train, "classification", "ekfoc")
    reference = Influence.from_laplace(la).pairwise(loader(train, 7), loader(test, 6))
    model32 = model.float()
    train32 = (train[0].float(), train[1])
    test32 = (test[0].float(), test[1])
    la32 = fitted(model32, train32, "classification", "ekfoc")
    scores = Influence.from_laplace(la32).pairwise(loader(train32, 7), loader(test32, 6))
    assert scores.dtype == torch.float32
    assert rel(scores.double(), reference) < 1e-3


def test_zero_gradients_score_zero():
    """A training input the model fits exactly (regression, zero residual) scores zero."""
    model, train, test = make("mlp", "regression", seed=5)
    with torch.no_grad():
        train[1][0] = model(train[0][:1])[0]
    la = fitted(model, train, "regression", "kfoc")
    scores = Influence.from_laplace(la).pairwise(loader(train, 7), loader(test, 6))
    assert torch.all(scores[:, 0] == 0) and torch.isfinite(scores).all()


def test_bad_input_is_named():
    model, train, test = make("mlp", "regression", seed=6)
    with pytest.raises(ValueError, match="margin"):
        Influence(
            model, lossfunc("regression"), Preconditioner.identity(model), measurement="margin"
        ).pairwise(loader(train, 7), loader(test, 6))
    with pytest.raises(ValueError, match="measurement"):
        Influence(model, lossfunc("regression"), Preconditioner.identity(model), measurement="grad")
    partial = Preconditioner.identity(model)
    partial = Preconditioner(partial.groups[:2])
    with pytest.raises(ValueError, match=r"no curvature block.*2\.weight"):
        Influence(model, lossfunc("regression"), partial)
    singular = {
        name: DenseBlock(torch.zeros(p.numel(), p.numel(), dtype=DTYPE))
        for name, p in model.named_parameters()
    }
    with pytest.raises(ValueError, match="not positive definite"):
        Preconditioner.from_blocks(singular, damping=0.0, rule="absolute")
    with pytest.raises(ValueError, match="damping_rule"):
        Preconditioner.from_blocks({"0.bias": DenseBlock(torch.eye(3))}, rule="median")
    assert Measurement("margin") is Measurement.MARGIN


def test_stored_gradients_give_the_streamed_scores():
    model, train, test = make("tokens", "classification", seed=7)
    la = fitted(model, train, "classification", "ekfoc")
    influence = Influence.from_laplace(la, measurement="margin")
    streamed = influence.pairwise(loader(train, 7), loader(test, 4))
    stored = influence.preconditioner.scores(
        influence.gradients(loader(test, 5), "margin"), influence.gradients(loader(train, 20))
    )
    assert torch.allclose(stored, streamed, rtol=1e-10, atol=1e-12)
