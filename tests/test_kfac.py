"""``hessian_structure="kfac"``: laplace-torch's ``kron`` from this package's per-sample pass.

Against laplace-torch's own ``kron`` with its default (curvlinops) backend on the same
model and data: equal factors for the exact GGN, and for the Monte-Carlo Fisher under
the labels the fit drew (curvlinops' empirical Fisher at those labels). Then on what
``kfoc`` fits and ``kron`` does not: dict batches, reward modeling, frozen parameters,
``torch.distributed`` ranks.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import os
import socket

import pytest
import torch
from laplace import Laplace
from laplace.curvature import CurvlinopsEF
from laplace_helpers import (
    DTYPE,
    dense_blocks,
    fit_seed,
    make_problem,
    mc_draws,
    single_thread,  # noqa: F401 (autouse fixture)
)
from reach_models import MODELS, input_shape
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kfoc_backpack import KFACLaplace, KFACLLLaplace, KFOCLaplace

SUBSETS = {"all": KFACLaplace, "last_layer": KFACLLLaplace}


def tokens_problem(likelihood: str):
    """A ``Linear`` on 5 tokens (a weight shared over positions) and a head."""
    torch.manual_seed(0)
    out = 3 if likelihood == "classification" else 2
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Flatten(), nn.Linear(30, out)).to(DTYPE)
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(23, 5, 4, generator=gen, dtype=DTYPE)
    if likelihood == "classification":
        y = torch.randint(0, out, (23,), generator=gen)
    else:
        y = torch.randn(23, out, generator=gen, dtype=DTYPE)
    loader = DataLoader(TensorDataset(X, y), batch_size=9)  # 9, 9, 5
    return model, loader


def problem_for(arch: str, likelihood: str):
    if arch == "tokens":
        return tokens_problem(likelihood)
    problem = make_problem(arch, likelihood)
    return problem.fresh_model(), problem.loader()


def assert_same_kron(ours, theirs, rtol=1e-6):
    assert len(ours.kfacs) == len(theirs.kfacs)
    for index, (mine, their) in enumerate(zip(ours.kfacs, theirs.kfacs)):
        assert len(mine) == len(their), index
        for a, b in zip(mine, their):
            torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max())


@pytest.mark.parametrize("subset", list(SUBSETS))
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("arch", ["mlp", "cnn", "tokens"])
def test_kfac_equals_laplace_torchs_kron_for_the_exact_ggn(arch, likelihood, subset):
    model, loader = problem_for(arch, likelihood)
    kron = Laplace(copy.deepcopy(model), likelihood, subset, "kron")
    kron.fit(loader)
    kfac = Laplace(copy.deepcopy(model), likelihood, subset, "kfac")
    assert type(kfac) is SUBSETS[subset]
    kfac.fit(loader)
    assert_same_kron(kfac.H_facs, kron.H_facs)
    assert kfac.n_data == kron.n_data and float(kfac.loss) == pytest.approx(float(kron.loss))
    for la in (kron, kfac):
        la.prior_precision = 0.7
    assert kfac.log_marginal_likelihood().item() == pytest.approx(
        kron.log_marginal_likelihood().item(), rel=1e-9
    )
    X = next(iter(loader))[0][:4]
    torch.testing.assert_close(kfac(X, pred_type="glm"), kron(X, pred_type="glm"))


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_kfac_mc_fisher_is_krons_at_the_labels_the_fit_drew(arch):
    """One sampled label per input: the Monte-Carlo Fisher is the empirical Fisher at ŷ."""
    problem = make_problem(arch, "classification")
    model = problem.fresh_model()
    kfac = Laplace(
        copy.deepcopy(model), "classification", "all", "kfac", backend_kwargs={"stochastic": True}
    )
    batches = list(problem.loader())  # a DataLoader's iter() would draw from the seed too
    torch.manual_seed(3)
    kfac.fit(batches)
    base = fit_seed(3)  # the package's seed policy: base seed, then batch i under base + i
    with torch.no_grad():
        drawn = [
            mc_draws(model(X), "classification", base + index)
            for index, (X, _) in enumerate(batches)
        ]
    relabelled = dataclasses.replace(problem, y=torch.cat(drawn))
    kron = Laplace(copy.deepcopy(model), "classification", "all", "kron", backend=CurvlinopsEF)
    kron.fit(relabelled.loader())
    assert_same_kron(kfac.H_facs, kron.H_facs)


def test_biases_of_shared_weights_are_krons_not_exact():
    """K-FAC's bias block counts positions as samples, as laplace-torch's ``kron``."""
    problem = make_problem("cnn", "classification")
    model = problem.fresh_model()
    kfac = Laplace(copy.deepcopy(model), "classification", "all", "kfac")
    kfac.fit(problem.loader())
    kfoc = Laplace(copy.deepcopy(model), "classification", "all", "kfoc")
    kfoc.fit(problem.loader())
    dense = dense_blocks(model, problem.X, problem.y, "classification", "ggn")
    (exact,) = kfoc.H_facs.kfacs[1]  # the first convolution's bias
    torch.testing.assert_close(exact, dense["0.bias"])
    (kfc,) = kfac.H_facs.kfacs[1]
    assert not torch.allclose(kfc, dense["0.bias"])


@pytest.mark.parametrize("name", ["mlp_dict", "residual", "frozen_bn", "transformer"])
def test_kfac_fits_what_kfoc_fits(name):
    """Dict batches, residual sums, frozen BatchNorm, attention with frozen projections."""
    torch.manual_seed(0)
    model = MODELS[name](outputs=3).to(DTYPE).eval()
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(10, *input_shape(name), generator=gen, dtype=DTYPE)
    y = torch.randint(0, 3, (10,), generator=gen)
    if name == "mlp_dict":
        loader = [{"input_ids": X[:6], "labels": y[:6]}, {"input_ids": X[6:], "labels": y[6:]}]
    else:
        loader = [(X[:6], y[:6]), (X[6:], y[6:])]
    la = Laplace(model, "classification", "all", "kfac")
    la.fit(loader)
    assert torch.isfinite(la.log_marginal_likelihood())
    params = [p for p in model.parameters() if p.requires_grad]
    assert la.n_params == sum(p.numel() for p in params)
    if name == "mlp_dict":  # one position per layer: K-FAC's bias blocks are exact
        dense = dense_blocks(model.inner, X, y, "classification", "ggn")
        names = [n for n, p in model.inner.named_parameters() if p.requires_grad]
        for pname, block in zip(names, la.H_facs.kfacs):
            if pname.endswith("bias"):
                torch.testing.assert_close(block[0], dense[pname])


def test_kfac_reward_modeling():
    from test_laplace_parity import model_for, pairs

    model = model_for("mlp")
    X, y = pairs("mlp")
    la = Laplace(model, "reward_modeling", "all", "kfac")
    la.fit([(X[:6], y[:6]), (X[6:], y[6:])])
    assert la.n_outputs == 2 and torch.isfinite(la.log_marginal_likelihood())
    rewards = la(X[:3, 0], pred_type="glm")
    assert all(torch.isfinite(r).all() for r in rewards)


def test_kfac_takes_no_aggregation_and_says_what_it_takes():
    model = make_problem("mlp", "classification").fresh_model()
    with pytest.raises(TypeError, match=r"KFACLaplace: .*'aggregation'.*'kfac' takes .*no arg"):
        Laplace(model, "classification", "all", "kfac", aggregation="running")
    parameters = inspect.signature(KFACLaplace).parameters
    assert "aggregation" not in parameters and "process_group" in parameters
    assert "aggregation" in inspect.signature(KFOCLaplace).parameters
    assert "last_layer_name" in inspect.signature(KFACLLLaplace).parameters
    with pytest.raises(ValueError, match="damping"):
        Laplace(model, "classification", "all", "ekfac", damping=True)


# --------------------------------------------------------------------------------------
# Ranks: two processes of one fit equal one process over both shards
# --------------------------------------------------------------------------------------


def _rank(rank: int, world: int, port: int, shards: list, out: str) -> None:
    from torch import distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = make_problem("cnn", "classification").fresh_model()
        la = Laplace(model, "classification", "all", "kfac")
        la.fit(shards[rank])
        torch.save({"kfacs": la.H_facs.kfacs, "n_data": la.n_data}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_kfac_over_ranks_equals_one_process(tmp_path):
    problem = make_problem("cnn", "classification")
    batches = list(problem.loader())  # 7, 3, 9, 4
    shards = [batches[:1], batches[1:]]  # uneven
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(_rank, args=(2, port, shards, str(tmp_path)), nprocs=2)
    one = Laplace(problem.fresh_model(), "classification", "all", "kfac")
    one.fit(batches)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["n_data"] == len(problem.X)
        for mine, ref in zip(result["kfacs"], one.H_facs.kfacs):
            for a, b in zip(mine, ref):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
