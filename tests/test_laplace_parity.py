"""laplace-torch parity: reward modeling, and the errors laplace-torch's callers catch.

``likelihood="reward_modeling"`` (laplace-torch's Bradley–Terry likelihood): each input
is a preference pair ``[2, *]`` that the model folds into its batch, scoring both
members with one network and returning the pair's two logits. The fit is the
classification curvature of those logits; the predictive is a regression on single
inputs. Every weight's ``L ⊗ R`` is checked against the dense block from ``torch.func``
on an untouched copy (float64), for the exact GGN, the Monte-Carlo Fisher (same labels)
and the empirical Fisher.
"""

from __future__ import annotations

import copy

import pytest
import torch
from laplace import KronLaplace, Laplace
from laplace_helpers import (
    assert_optimal,
    dense_blocks,
    fit_seed,
    mc_draws,
    single_thread,  # noqa: F401 (autouse fixture)
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kfoc_backpack import KFOCBackend, KFOCEFBackend, KFOCLaplace, KFOCLLLaplace
from kfoc_backpack.collect.batch_layout import PLAIN, BatchLayout, detect_layout
from kfoc_backpack.laplace import BatchKeyError, UnsupportedDtypeError

DTYPE = torch.float64
NUM = 11
BATCHES = [4, 1, 6]  # uneven, with a batch of one
TIGHT = {"tol": 1e-11, "max_iter": 5000}
SUBSETS = {"all": KFOCLaplace, "last_layer": KFOCLLLaplace}


class PairMLP(nn.Module):
    """Reward model scoring both members of ``[N, 2, D]`` pairs with one network.

    ``order="sample"`` folds the pairs by ``reshape`` (rows ``2n, 2n + 1``, as
    laplace-torch's own reward model does); ``"group"`` stacks the first and second
    members by ``torch.cat`` (rows ``n`` and ``N + n``).
    """

    def __init__(self, order: str = "sample"):
        super().__init__()
        self.order = order
        self.net = nn.Sequential(
            nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 1)
        )

    def forward(self, x):
        if x.dim() == 2:  # single inputs: one reward each
            return self.net(x)
        num = x.shape[0]
        if self.order == "sample":
            return self.net(x.reshape(-1, x.shape[-1])).reshape(num, 2)
        scores = self.net(torch.cat([x[:, 0], x[:, 1]]))
        return torch.cat([scores[:num], scores[num:]], dim=1)


class PairCNN(nn.Module):
    """Reward model on image pairs ``[N, 2, 1, 5, 5]`` (strided, dilated, padded convolutions)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1, stride=2),
            nn.Tanh(),
            nn.Conv2d(3, 2, 2, dilation=2, padding=1),
            nn.Tanh(),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * 3 * 3, 1)

    def forward(self, x):
        if x.dim() == 4:
            return self.head(self.features(x))
        num = x.shape[0]
        return self.head(self.features(x.flatten(end_dim=1))).reshape(num, 2)


class CoupledPairs(PairMLP):
    """Scores the wrong rows (a roll mixes pairs): inputs are not independent."""

    def forward(self, x):
        flat = self.net(x.reshape(-1, x.shape[-1])).roll(1, 0)
        return flat.reshape(x.shape[0], 2)


MODELS = {
    "mlp": lambda: PairMLP("sample"),
    "mlp_group": lambda: PairMLP("group"),
    "cnn": PairCNN,
}
PAIR_SHAPES = {"mlp": (2, 3), "mlp_group": (2, 3), "cnn": (2, 1, 5, 5)}


def model_for(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name]().to(DTYPE).eval()


def pairs(name: str, num: int = NUM, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(num, *PAIR_SHAPES[name], generator=gen, dtype=DTYPE)
    y = torch.randint(0, 2, (num,), generator=gen)
    return X, y


def singles(name: str, num: int = 5):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(num, *PAIR_SHAPES[name][1:], generator=gen, dtype=DTYPE)


def batches(X, y, sizes=BATCHES):
    out, start = [], 0
    for size in sizes:
        out.append((X[start : start + size], y[start : start + size]))
        start += size
    return out


def backend_for(curvature: str):
    backend = KFOCEFBackend if curvature == "ef" else KFOCBackend
    kwargs = {"stochastic": True} if curvature == "mc" else {}
    return backend, {**kwargs, **TIGHT}


# --------------------------------------------------------------------------------------
# Reward modeling: optimal against the dense curvature of the pair logits
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("curvature", ["ggn", "mc", "ef"])
@pytest.mark.parametrize("name", list(MODELS))
def test_reward_modeling_one_batch_is_optimal(name, curvature):
    model = model_for(name)
    X, y = pairs(name)
    backend, kwargs = backend_for(curvature)
    la = Laplace(model, "reward_modeling", "all", "kfoc", backend=backend, backend_kwargs=kwargs)
    assert type(la) is KFOCLaplace
    torch.manual_seed(5)
    la.fit([(X, y)])
    seed = fit_seed(5)
    draws = mc_draws(model(X).detach(), "classification", seed) if curvature == "mc" else None
    blocks = dense_blocks(model, X, y, "classification", curvature, draws)
    assert_optimal(blocks, list(model.named_parameters()), la.H_facs.kfacs)
    assert la.n_data == NUM and la.n_outputs == 2


@pytest.mark.parametrize("curvature", ["ggn", "ef"])
@pytest.mark.parametrize("name", ["mlp_group", "cnn"])
def test_reward_modeling_dataset_optimum_over_uneven_batches(name, curvature):
    model = model_for(name)
    X, y = pairs(name)
    backend, kwargs = backend_for(curvature)
    la = KFOCLaplace(
        model,
        "reward_modeling",
        backend=backend,
        backend_kwargs=kwargs,
        aggregation="optimal",
        tol=1e-11,
        max_passes=5000,
    )
    la.fit(batches(X, y))
    blocks = dense_blocks(model, X, y, "classification", curvature)
    assert_optimal(blocks, list(model.named_parameters()), la.H_facs.kfacs)


@pytest.mark.parametrize("curvature", ["ggn", "mc", "ef"])
def test_reward_modeling_last_layer_block_is_exact(curvature):
    """A reward head has one output: its block is exactly ``1 × 1 ⊗ R``."""
    model = model_for("mlp")
    X, y = pairs("mlp")
    backend, kwargs = backend_for(curvature)
    la = Laplace(
        model, "reward_modeling", "last_layer", "kfoc", backend=backend, backend_kwargs=kwargs
    )
    assert type(la) is KFOCLLLaplace
    torch.manual_seed(5)
    la.fit([(X, y)])
    seed = fit_seed(5)
    draws = mc_draws(model(X).detach(), "classification", seed) if curvature == "mc" else None
    blocks = dense_blocks(model, X, y, "classification", curvature, draws)
    head = [(f"net.4.{n}", p) for n, p in model.net[4].named_parameters()]
    assert_optimal(blocks, head, la.H_facs.kfacs, tol=1e-12)


def _dense_glm_variance(la, model, x):
    """``J P⁻¹ Jᵀ`` per single input, ``J`` by ``torch.func``, ``P`` the posterior precision."""
    ref = copy.deepcopy(model)
    params = dict(ref.named_parameters())
    names = [n for n, p in params.items() if p.requires_grad]
    if isinstance(la, KFOCLLLaplace):
        names = [n for n in names if n.startswith("net.4.")]
    fixed = {n: p.detach() for n, p in params.items() if n not in names}

    def forward(trainable):
        return torch.func.functional_call(ref, {**fixed, **trainable}, (x,))

    jac = torch.func.jacrev(forward)({n: params[n].detach() for n in names})
    J = torch.cat([jac[n].flatten(2) for n in names], dim=2)  # [n, 1, P]
    covariance = torch.linalg.inv(la.posterior_precision.to_matrix())
    return torch.einsum("nop,pq,nkq->nok", J, covariance, J)


@pytest.mark.parametrize("subset", list(SUBSETS))
def test_reward_modeling_workflow(subset):
    """fit → marginal likelihood → prior optimisation → GLM and NN predictives on singles."""
    model = model_for("mlp")
    X, y = pairs("mlp")
    loader = DataLoader(TensorDataset(X, y), batch_size=4)
    la = Laplace(model, "reward_modeling", subset, "kfoc")
    la.fit(loader)
    assert la.n_data == NUM
    before = la.log_marginal_likelihood().item()
    assert torch.isfinite(torch.tensor(before))
    la.optimize_prior_precision(method="marglik", n_steps=30, pred_type="glm")
    assert la.log_marginal_likelihood().item() >= before - 1e-8

    x = singles("mlp")
    mean, var = la(x, pred_type="glm")
    torch.testing.assert_close(mean, model(x).detach())
    assert var.shape == (5, 1, 1)
    torch.testing.assert_close(var, _dense_glm_variance(la, model, x), rtol=1e-6, atol=1e-12)

    mean_nn, var_nn = la(x, pred_type="nn", link_approx="mc", n_samples=50)
    assert mean_nn.shape == var_nn.shape == (5, 1)
    assert torch.isfinite(mean_nn).all() and (var_nn > 0).all()
    with pytest.raises(ValueError):
        la(x, pred_type="linear")


@pytest.mark.parametrize("subset", list(SUBSETS))
def test_reward_modeling_dict_batches_match_tensor_batches(subset):
    class DictPairs(PairMLP):
        def forward(self, data):
            return super().forward(data["pairs"] if isinstance(data, dict) else data)

    torch.manual_seed(0)
    model = DictPairs().to(DTYPE)
    X, y = pairs("mlp")
    dicts = [{"pairs": xb, "preferred": yb} for xb, yb in batches(X, y)]
    la = Laplace(copy.deepcopy(model), "reward_modeling", subset, "kfoc", dict_key_y="preferred")
    la.fit(dicts)
    ref = Laplace(copy.deepcopy(model), "reward_modeling", subset, "kfoc")
    ref.fit(batches(X, y))
    for mine, other in zip(la.H_facs.kfacs, ref.H_facs.kfacs):
        for a, b in zip(mine, other):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    x = {"pairs": singles("mlp")}
    for a, b in zip(la(x, pred_type="glm"), ref(x["pairs"], pred_type="glm")):
        torch.testing.assert_close(a, b)


def test_reward_modeling_through_kronlaplace_with_the_backend():
    """laplace-torch's own ``KronLaplace`` with ``KFOCBackend`` takes reward modeling too."""
    model = model_for("mlp")
    X, y = pairs("mlp")
    la = KronLaplace(model, "reward_modeling", backend=KFOCBackend, backend_kwargs=TIGHT)
    la.fit(DataLoader(TensorDataset(X, y), batch_size=NUM))
    blocks = dense_blocks(model, X, y, "classification", "ggn")
    assert_optimal(blocks, list(model.named_parameters()), la.H_facs.kfacs)


def test_coupled_pairs_are_refused_naming_the_layer():
    model = CoupledPairs().to(DTYPE)
    X, y = pairs("mlp")
    la = Laplace(model, "reward_modeling", "all", "kfoc")
    with pytest.raises(NotImplementedError, match=r"'net\.0'.*independent inputs"):
        la.fit([(X, y)])


# --------------------------------------------------------------------------------------
# Batch layouts (unit level)
# --------------------------------------------------------------------------------------


def _probe(rows: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    grad = torch.zeros(shape)
    grad[rows] = 1.0
    return grad


def test_detect_layout_finds_folds_and_refuses_coupling():
    shape = (6, 4)  # 3 inputs, 2 rows each
    assert detect_layout(shape, 3, _probe([0, 1], shape), True, PLAIN) == BatchLayout(fold=2)
    group = BatchLayout(fold=2, sample_major=False)
    assert detect_layout(shape, 3, _probe([0, 3], shape), True, PLAIN) == group
    assert detect_layout(shape, 3, None, True, group) == group  # kept from an earlier batch
    assert detect_layout(shape, 3, torch.zeros(shape), True, PLAIN) == BatchLayout(fold=2)
    with pytest.raises(ValueError, match="other inputs"):
        detect_layout(shape, 3, _probe([0, 5], shape), True, PLAIN)
    assert detect_layout((5, 4), 3, None, True, PLAIN) is None
    # dimension 1 only where the layer's features are last (Linear)
    seq_first = (7, 3, 4)
    grad = torch.zeros(seq_first)
    grad[:, 0] = 1.0
    assert detect_layout(seq_first, 3, grad, True, PLAIN) == BatchLayout(dim=1)
    assert detect_layout(seq_first, 3, grad, False, PLAIN) is None


def test_layout_positions_put_rows_beside_positions():
    num, fold, channels, positions = 3, 2, 4, 5
    per_input = torch.randn(num, fold, channels, positions)
    expected = per_input.permute(0, 2, 1, 3).reshape(num, channels, fold * positions)
    sample_major = per_input.flatten(end_dim=1)
    group_major = per_input.transpose(0, 1).flatten(end_dim=1)
    for layout, folded in (
        (BatchLayout(fold=fold), sample_major),
        (BatchLayout(fold=fold, sample_major=False), group_major),
    ):
        torch.testing.assert_close(layout.positions(folded), expected)
        lead = layout.positions(folded.unsqueeze(0).expand(2, -1, -1, -1), lead=1)
        torch.testing.assert_close(lead, expected.expand(2, -1, -1, -1))
    torch.testing.assert_close(PLAIN.positions(sample_major), sample_major)


# --------------------------------------------------------------------------------------
# Errors of the classes laplace-torch's callers catch
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("likelihood", ["classification", "regression", "reward_modeling"])
@pytest.mark.parametrize("subset", list(SUBSETS))
def test_missing_dict_key_is_a_key_error(subset, likelihood):
    class DictModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))

        def forward(self, data):
            return self.net(data["features"])

    loader = [{"features": torch.randn(3, 5), "target": torch.randint(0, 2, (3,))}]
    # caught as laplace-torch's batch[dict_key_y] raises it, and as a malformed batch
    for caught_as in (KeyError, ValueError):
        la = Laplace(DictModel(), likelihood, subset, "kfoc")  # default dict_key_y="labels"
        with pytest.raises(caught_as) as caught:
            la.fit(loader)
        assert type(caught.value) is BatchKeyError and la.H_facs is None  # before any work
        message = str(caught.value)
        assert "'labels'" in message and "dict_key_y" in message and "'target'" in message
        assert not message.startswith('"')  # the message, not KeyError's quoted repr


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("subset", list(SUBSETS))
def test_half_precision_is_a_type_and_value_error(subset, dtype):
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)
    loader = DataLoader(
        TensorDataset(torch.randn(6, 3, dtype=dtype), torch.randn(6, 3, dtype=dtype)),
        batch_size=3,
    )
    # the type is what is wrong; laplace-torch's callers catch ValueError around such a fit
    for caught_as in (TypeError, ValueError):
        la = Laplace(model, "regression", subset, "kfoc")
        with pytest.raises(caught_as, match=r"float32 or float64.*model\.float\(\)") as caught:
            la.fit(loader)
        assert type(caught.value) is UnsupportedDtypeError
        assert la.H_facs is None  # refused before any curvature, not ended in an eigh
