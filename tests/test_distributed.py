"""Data-parallel K-FOC over ``torch.distributed`` ranks (docs/conventions.md §8).

The ranks are real processes (gloo on the CPU, a free port, a bounded wait) started by
the module's fixtures; each runs tests/distributed_worker.py on its shard of a small
float64 problem (uneven shards for two ranks, an empty one for three). The reference is
the single-process fit over the concatenated shards, computed here; for the
Monte-Carlo Fisher it is fed the per-batch quantities each rank recorded under the
labels it drew, and every optimum is also checked against a dense SVD.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import distributed_cases as cases
import pytest
import torch
from ground_truth import optimal_relative_error, relative_error
from laplace_helpers import dense_ggn_blocks

from kfoc_backpack import optimal_factors
from kfoc_backpack.blocks import KroneckerBlock
from kfoc_backpack.collect.batch import BatchQuantities, model_zero_blocks
from kfoc_backpack.collect.layer_terms import DenseTerms, LayerTerms
from kfoc_backpack.dataset import DataPass, KFOCFactors

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
TIME_LIMIT = 420
"""Seconds the ranks of one launch may take in all (a few tens of seconds on 2 cores)."""

ARCHS = ("mlp", "cnn")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(world: int, scenario: str, out: Path) -> list[dict]:
    """Start ``world`` ranks, wait at most :data:`TIME_LIMIT`, return their results."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(r), str(world), str(port), scenario, str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        for r in range(world)
    ]
    deadline = time.monotonic() + TIME_LIMIT
    logs = []
    try:
        for proc in procs:
            stdout, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            logs.append(stdout.decode(errors="replace"))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail(f"{world} ranks of '{scenario}' did not finish within {TIME_LIMIT} s")
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"rank {rank} exited with {proc.returncode}:\n{log[-3000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module", params=(2, 3), ids=lambda w: f"world{w}")
def fitted(request, tmp_path_factory) -> tuple[int, list[dict]]:
    world = request.param
    return world, launch(world, "fits", tmp_path_factory.mktemp(f"world{world}"))


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-6) -> bool:
    return bool((a - b).norm() <= rtol * b.norm() + 1e-300)


def assert_same_on_every_rank(per_rank: list[list[list[torch.Tensor]]]) -> None:
    for other in per_rank[1:]:
        for block, ref in zip(other, per_rank[0]):
            assert all(torch.equal(a, b) for a, b in zip(block, ref))


# ------------------------------------------------------------------------------------
# KFOCLaplace (hook route), exact GGN
# ------------------------------------------------------------------------------------


laplace_reference = cases.fit_laplace


@pytest.mark.parametrize("arch", (*ARCHS, "residual"))
@pytest.mark.parametrize("key", [("optimal", True), ("optimal", False), ("approx", None)], ids=str)
def test_laplace_matches_one_process(fitted, arch, key):
    """``"optimal"`` (stored and streamed) and ``"approx"``: the one-process fit, on every rank.

    ``residual`` is an ``nn.Module`` subclass (residual sum, GELU, BatchNorm, parameters
    of its own, everything trainable) fed dict batches."""
    world, ranks = fitted
    results = [r[arch]["laplace"][key] for r in ranks]
    assert_same_on_every_rank([r["kfacs"] for r in results])
    shards = cases.all_shards(arch, world)
    ref = laplace_reference(arch, [b for s in shards for b in s], *key)
    trainable = [(n, p) for n, p in cases.make_model(arch).named_parameters() if p.requires_grad]
    assert len(trainable) == len(results[0]["kfacs"]) == len(ref.H_facs.kfacs)
    for (name, param), block, ref_block in zip(trainable, results[0]["kfacs"], ref.H_facs.kfacs):
        rtol = 1e-12 if param.dim() == 1 else 1e-6  # bias blocks are exact sums
        for factor, ref_factor in zip(block, ref_block):
            assert close(factor, ref_factor, rtol), name
    for result in results:
        assert result["n_data"] == cases.NUM_DATA == ref.n_data
        assert result["loss"] == pytest.approx(float(ref.loss), rel=1e-12)
        assert result["communication"].collectives > 0


@pytest.mark.parametrize("aggregation", ("optimal", "approx"))
def test_last_layer_laplace_matches_one_process(fitted, aggregation):
    """``KFOCLLLaplace``: the same combination, through laplace-torch's last-layer fit."""
    world, ranks = fitted
    results = [r["last_layer"][aggregation] for r in ranks]
    assert_same_on_every_rank([r["kfacs"] for r in results])
    shards = cases.all_shards("mlp", world)
    ref = cases.fit_laplace("mlp", [b for s in shards for b in s], aggregation, last_layer_name="2")
    for block, ref_block in zip(results[0]["kfacs"], ref.H_facs.kfacs):
        for factor, ref_factor in zip(block, ref_block):
            assert close(factor, ref_factor, 1e-6)
    for result in results:
        assert result["n_data"] == cases.NUM_DATA
        assert result["loss"] == pytest.approx(float(ref.loss), rel=1e-12)


@pytest.mark.parametrize("aggregation", ("optimal", "approx"))
def test_online_update_counts_the_earlier_fit_once(fitted, aggregation):
    """``fit(…, override=False)`` over ranks: the one-process online fit of the same halves."""
    world, ranks = fitted
    results = [r["online"][aggregation] for r in ranks]
    assert_same_on_every_rank([r["kfacs"] for r in results])
    parts = [cases.halves(s) for s in cases.all_shards("mlp", world)]
    ref = cases.fit_laplace("mlp", [b for first, _ in parts for b in first], aggregation)
    ref.fit([b for _, second in parts for b in second], override=False)
    for block, ref_block in zip(results[0]["kfacs"], ref.H_facs.kfacs):
        for factor, ref_factor in zip(block, ref_block):
            assert close(factor, ref_factor, 1e-6)
    assert all(r["n_data"] == ref.n_data == cases.NUM_DATA for r in results)


def test_process_group_selects_the_ranks(fitted):
    """``process_group=`` of the last two ranks: their shards only (for three ranks one
    of them empty), on both."""
    world, ranks = fitted
    members = [world - 2, world - 1]
    assert all(ranks[r]["subgroup"] is None for r in range(world) if r not in members)
    shards = cases.all_shards("mlp", world)
    ref = optimal_factors(
        cases.make_model("mlp"),
        cases.loss_for("mlp"),
        [b for r in members for b in shards[r]],
        tol=1e-12,
        max_passes=400,
    )
    for r in members:
        result = ranks[r]["subgroup"]
        sizes = sum(cases.SHARDS[world][r] for r in members)
        assert result["num_samples"] == ref.num_samples == sizes
        for name, factors in ref.factors.items():
            for factor, ref_factor in zip(result["factors"][name], factors):
                assert close(factor, ref_factor, 1e-6), name


@pytest.mark.parametrize("aggregation", ("optimal", "approx", "running"))
def test_monte_carlo_fit_is_reproducible(fitted, aggregation):
    """Labels seeded per rank and batch: the same fit twice, the same on every rank."""
    _, ranks = fitted
    for result in ranks:
        first, second = result["monte_carlo"][aggregation]
        for block, again in zip(first, second):
            assert all(torch.equal(a, b) for a, b in zip(block, again))
    assert_same_on_every_rank([r["monte_carlo"][aggregation][0] for r in ranks])


def dense_blocks(arch: str, data: list) -> dict[str, torch.Tensor]:
    model = cases.make_model(arch)
    blocks = {}
    for X, _ in data:
        for name, block in dense_ggn_blocks(model, X, "classification").items():
            blocks[name] = blocks.get(name, 0) + block
    return blocks


@pytest.mark.parametrize("arch", ARCHS)
def test_laplace_running_within_bound(fitted, arch):
    """``"running"``: ``‖F − K‖ ≤ 2 Σ_r ‖F_r − P_r‖ + min ‖F − L ⊗ R‖`` (docs §8)."""
    world, ranks = fitted
    results = [r[arch]["laplace"][("running", None)] for r in ranks]
    assert_same_on_every_rank([r["kfacs"] for r in results])
    shards = cases.all_shards(arch, world)
    total = dense_blocks(arch, [b for s in shards for b in s])
    per_rank = [dense_blocks(arch, s) if s else {} for s in shards]
    locals_ = [laplace_reference(arch, s, "running", None) if s else None for s in shards]
    one_process = laplace_reference(arch, [b for s in shards for b in s], "running", None)
    model = cases.make_model(arch)
    for index, (name, param) in enumerate(model.named_parameters()):
        if param.dim() == 1:
            assert close(results[0]["kfacs"][index][0], one_process.H_facs.kfacs[index][0], 1e-12)
            continue
        F = total[name]
        m, n = param.shape[0], param[0].numel()
        distance = relative_error(F, *results[0]["kfacs"][index]) * F.norm()
        rank_errors = sum(
            (per_rank[r][name] - torch.kron(*locals_[r].H_facs.kfacs[index])).norm()
            for r in range(world)
            if locals_[r] is not None
        )
        bound = 2 * rank_errors + optimal_relative_error(F, m, n) * F.norm()
        assert distance <= bound * (1 + 1e-9), name


@pytest.mark.parametrize("structure", ("ekfoc", "ekfac"))
@pytest.mark.parametrize("arch", ARCHS)
def test_corrected_eigenvalues_sum_exactly_over_ranks(fitted, arch, structure):
    """``ekfoc``/``ekfac``: every rank's ``S`` is the diagonal of the all-data block."""
    world, ranks = fitted
    results = [r["corrected"][(arch, structure)] for r in ranks]
    assert_same_on_every_rank([r["values"] for r in results])
    assert_same_on_every_rank([r["vectors"] for r in results])
    shards = cases.all_shards(arch, world)
    total = dense_blocks(arch, [b for s in shards for b in s])
    model = cases.make_model(arch)
    for (name, param), vectors, values in zip(
        model.named_parameters(), results[0]["vectors"], results[0]["values"]
    ):
        F = total[name]
        basis = vectors[0] if param.dim() == 1 else torch.kron(*vectors)
        if param.dim() == 1:
            assert close((basis * values[0]) @ basis.T, F, 1e-10), name
            continue
        expected = torch.diagonal(basis.T @ F @ basis).reshape(values[0].shape)
        assert close(values[0], expected, 1e-10), name
    assert all(r["n_data"] == cases.NUM_DATA for r in results)


def test_corrected_monte_carlo_is_reproducible(fitted):
    """The factor and correction passes draw the same seeded labels on every rank.

    The third fit reads batches again on rank 0 only (a byte budget of 0 keeps only
    the last batch), while the other ranks keep all theirs: the same ``S``.
    """
    _, ranks = fitted
    for result in ranks:
        first, second, reread = result["corrected"]["monte_carlo"]
        assert all(torch.equal(a, b) for a, b in zip(first, second))
        assert all(torch.allclose(a, b, rtol=1e-10, atol=0) for a, b in zip(first, reread))
    assert_same_on_every_rank([[r["corrected"]["monte_carlo"][0]] for r in ranks])


# ------------------------------------------------------------------------------------
# BackPACK route, Monte-Carlo Fisher: optimal_factors and KFOCAccumulator
# ------------------------------------------------------------------------------------


def replayed(ranks: list[dict], arch: str) -> list[tuple[int, dict]]:
    """Every rank's recorded batches, in rank order: the concatenated data."""
    return [batch for r in ranks for batch in r[arch]["backpack"]["replay"]]


def dense_target(batches: list[tuple[int, dict]], name: str, reduction: str) -> torch.Tensor:
    total = sum(num for num, _ in batches)
    blocks = []
    for num, quantities in batches:
        value = quantities[name]
        scale = num / total if reduction == "mean" else 1.0
        blocks.append(scale * value.terms.dense())
    return sum(blocks)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("store", (True, False), ids=("stored", "streamed"))
def test_optimal_factors_match_one_process(fitted, arch, store):
    """The data-set optimum of the ranks' union, equal to one process and to a dense SVD."""
    world, ranks = fitted
    results = [r[arch]["backpack"][("optimal", store)] for r in ranks]
    names = list(results[0].factors)
    assert_same_on_every_rank([[r.factors[n] for n in names] for r in results])
    batches = replayed(ranks, arch)
    reduction = cases.loss_for(arch).reduction

    model = cases.make_model(arch)
    params = dict(model.named_parameters())
    data = DataPass(
        Replay(batches, model),
        list(range(len(batches))),
        params,
        split=lambda i: (i, None),
        reduction=reduction,
    )
    ref = KFOCFactors("optimal", tol=1e-12, max_passes=400).fit(data)
    for name, param in params.items():
        for factor, ref_factor in zip(results[0].factors[name], ref.blocks[name].kfacs):
            assert close(factor, ref_factor, 1e-12 if param.dim() == 1 else 1e-6), name
        if param.dim() > 1:
            F = dense_target(batches, name, reduction)
            m, n = param.shape[0], param[0].numel()
            error = relative_error(F, *results[0].factors[name])
            assert error == pytest.approx(optimal_relative_error(F, m, n), abs=1e-9), name
    for result in results:
        assert result.num_samples == cases.NUM_DATA
        assert result.communication.bytes == results[0].communication.bytes > 0


class Replay:
    """A collector that replays the per-batch quantities a rank recorded (savefields)."""

    def __init__(self, batches: list[tuple[int, dict]], model: torch.nn.Module):
        self.batches, self.zeros = batches, model_zero_blocks(model)

    def __call__(self, index: int, _, *, with_kfac: bool = False) -> BatchQuantities:
        num, quantities = self.batches[index]
        batch = BatchQuantities(torch.tensor(0.0), num, {}, {})
        for name, value in quantities.items():
            if isinstance(value, LayerTerms):
                batch.weights[name] = value
            else:
                batch.dense[name] = DenseTerms(self.zeros[name].from_kfacs(value))
        return batch

    def zero_blocks(self):
        return self.zeros


def batch_block(zero, value):
    """The batch's K-FOC block of a weight's terms, or a bias's exact block."""
    if isinstance(value, LayerTerms):
        return value.kfoc(value.solve())
    return zero.from_kfacs(value)


@pytest.mark.parametrize("arch", ARCHS)
def test_accumulator_approx_matches_one_process(fitted, arch):
    """``KFOCAccumulator`` ``"approx"``: factor-wise sums over all ranks' batches."""
    world, ranks = fitted
    results = [r[arch]["backpack"][("approx", None)] for r in ranks]
    batches = replayed(ranks, arch)
    reduction = cases.loss_for(arch).reduction
    zeros = model_zero_blocks(cases.make_model(arch))
    for name, factors in results[0].items():
        ref = zeros[name].new_sum("approx")
        for num, quantities in batches:
            block = batch_block(zeros[name], quantities[name])
            ref.add(block, num, num if reduction == "mean" else 1.0)
        expected = ref.result()
        if reduction == "mean":
            expected = expected.scaled(1 / cases.NUM_DATA)
        for factor, ref_factor in zip(factors, expected.kfacs):
            assert close(factor, ref_factor, 1e-12), name
        for other in results[1:]:
            assert all(torch.equal(a, b) for a, b in zip(other[name], factors))


@pytest.mark.parametrize("arch", ARCHS)
def test_accumulator_running_within_bound(fitted, arch):
    """``KFOCAccumulator`` ``"running"`` within the bound of docs §8."""
    world, ranks = fitted
    result = ranks[0][arch]["backpack"][("running", None)]
    reduction = cases.loss_for(arch).reduction
    all_batches = replayed(ranks, arch)
    scale = 1 / cases.NUM_DATA if reduction == "mean" else 1.0
    zeros = model_zero_blocks(cases.make_model(arch))
    for name, factors in result.items():
        if not isinstance(zeros[name], KroneckerBlock):
            continue  # biases: exact
        F = dense_target(all_batches, name, reduction)
        rank_errors = 0.0
        for r in range(world):
            own = ranks[r][arch]["backpack"]["replay"]
            if not own:
                continue
            local = zeros[name].new_sum("running")
            for num, quantities in own:
                block = batch_block(zeros[name], quantities[name])
                local.add(block, num, num if reduction == "mean" else 1.0)
            F_r = sum(
                (num * scale if reduction == "mean" else 1.0) * q[name].terms.dense()
                for num, q in own
            )
            left, right = local.result()
            rank_errors += (F_r - torch.kron(left * scale, right)).norm()
        m = factors[0].shape[0]
        n = factors[1].shape[0]
        distance = relative_error(F, *factors) * F.norm()
        bound = 2 * rank_errors + optimal_relative_error(F, m, n) * F.norm()
        assert distance <= bound * (1 + 1e-9), name


# ------------------------------------------------------------------------------------
# Faults and the one-process default
# ------------------------------------------------------------------------------------


def test_a_failing_rank_stops_every_rank(tmp_path):
    """Rank 1's loader raises mid-fit: every rank ends, naming rank 1 and its error."""
    ranks = launch(2, "faults", tmp_path)
    for result in ranks:
        for aggregation in ("optimal", "approx", "running"):
            kind, message = result[("raises", aggregation)]
            assert kind == "DistributedFitError"
            assert "rank 1 raised RuntimeError: loader broke on purpose" in message
        kind, message = result["mismatch"]
        assert kind == "ValueError" and "rank 1 has trainable parameters" in message


def test_process_group_needs_initialised_distributed():
    """A ``process_group`` without ``torch.distributed`` is an error, not ignored."""
    model = cases.make_model("mlp")
    data = cases.shard("mlp", 0, 2)
    with pytest.raises(ValueError, match="not initialised"):
        optimal_factors(model, cases.loss_for("mlp"), data, process_group=object())
