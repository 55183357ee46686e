"""The one pass over the data: its seed policy, reductions, errors, and that it is the only one.

Every approximation reads batches through :class:`~kfoc_backpack.dataset.DataPass`, so
its policy is the package's: a target that draws labels gets one base seed per fit and
every batch its own seed from it, the same in every pass.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import torch

from kfoc_backpack.blocks import DenseBlock
from kfoc_backpack.collect import BatchQuantities
from kfoc_backpack.dataset import DataPass
from kfoc_backpack.enums import Aggregation, Curvature, Reduction, Route, Structure

PACKAGE = Path(__file__).resolve().parents[1] / "kfoc_backpack"
LOOP_CALLS = ("tqdm", "enumerate")


class Recorder:
    """A collector that records one random draw per batch (a stand-in for MC labels)."""

    def __init__(self):
        self.draws: list[float] = []

    def __call__(self, X, y, *, with_kfac=False):
        self.draws.append(float(torch.rand(())))
        return BatchQuantities(torch.tensor(0.0), len(X), {}, {})

    def zero_blocks(self):
        return {"b": DenseBlock(torch.zeros(2, 2))}


def batches(sizes=(3, 1, 4)):
    return [(torch.zeros(n, 2), torch.zeros(n)) for n in sizes]


PARAMS = {"b": torch.nn.Parameter(torch.zeros(2))}


def test_monte_carlo_passes_draw_the_same_labels_per_batch():
    collect = Recorder()
    torch.manual_seed(0)
    data = DataPass(collect, batches(), PARAMS, curvature="mc")
    after_seed = torch.get_rng_state()
    data.run(lambda batch, scale: None, "first")
    data.run(lambda batch, scale: None, "second")
    first, second = collect.draws[:3], collect.draws[3:]
    assert first == second  # every pass of one fit: the same draws for the same batch
    assert len(set(first)) == 3  # each batch its own seed
    assert torch.equal(torch.get_rng_state(), after_seed)  # the global generator untouched
    torch.manual_seed(0)
    base = int(torch.randint(0, 2**31 - 1, ()).item())  # the one draw: the base seed
    assert data.seed == base and torch.equal(torch.get_rng_state(), after_seed)
    # the same seed gives the same fit, another seed other draws
    again, other = Recorder(), Recorder()
    DataPass(again, batches(), PARAMS, curvature="mc", seed=base).run(lambda *_: None, "x")
    DataPass(other, batches(), PARAMS, curvature="mc", seed=base + 7).run(lambda *_: None, "x")
    assert again.draws == first and other.draws != first


@pytest.mark.parametrize("curvature", ["ggn", "ef"])
def test_exact_targets_draw_nothing(curvature):
    collect = Recorder()
    torch.manual_seed(0)
    state = torch.get_rng_state()
    data = DataPass(collect, batches(), PARAMS, curvature=curvature)
    assert data.seed is None and torch.equal(torch.get_rng_state(), state)
    data.run(lambda *_: None, "first")
    data.run(lambda *_: None, "second")
    assert collect.draws[:3] != collect.draws[3:]  # torch's global generator as it runs


@pytest.mark.parametrize(("reduction", "scales"), [("sum", [1.0, 1.0, 1.0]), ("mean", [3, 1, 4])])
def test_reduction_weighs_batches_by_their_inputs(reduction, scales):
    seen = []
    data = DataPass(Recorder(), batches(), PARAMS, reduction=reduction)
    loss, num = data.run(lambda batch, scale: seen.append(scale), "pass")
    assert seen == [float(s) for s in scales] and num == 8
    assert data.totals(loss, num) == (torch.tensor(0.0), 8)
    assert data.passes == 1


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"curvature 'fisher'; supported: 'ggn', 'mc', 'ef'"):
        DataPass(Recorder(), batches(), PARAMS, curvature="fisher")
    with pytest.raises(ValueError, match=r"Unknown reduction 'none'; supported: 'mean', 'sum'"):
        DataPass(Recorder(), batches(), PARAMS, reduction="none")
    data = DataPass(Recorder(), [{"input_ids": torch.zeros(2, 2)}], PARAMS)
    with pytest.raises(ValueError, match=r"batches \(X, y\) of tensors.*dict"):
        data.run(lambda *_: None, "pass")
    failing = DataPass(Recorder(), batches(), PARAMS)
    with pytest.raises(RuntimeError, match="inside the visit"):
        failing.run(lambda *_: (_ for _ in ()).throw(RuntimeError("inside the visit")), "pass")


def test_options_are_string_enums():
    assert Aggregation("running") is Aggregation.RUNNING == "running"
    assert Aggregation.parse(Aggregation.APPROX) is Aggregation.APPROX
    assert str(Route.OUTPUT_GRAM) == "output-gram" and f"{Structure.KFAC}" == "kfac"
    assert json.dumps({"route": Route.FORMED}) == '{"route": "formed"}'
    assert Curvature.MC.stochastic and not Curvature.GGN.stochastic
    assert Reduction.MEAN.batch_scale(4) == 4.0 and Reduction.SUM.batch_scale(4) == 1.0
    with pytest.raises(ValueError, match=r"Unknown aggregation 'optimal'; supported: 'approx', "):
        Aggregation.parse("optimal", "aggregation", members=Aggregation.of_factors())


# --------------------------------------------------------------------------------------
# One loop, one seed policy, one reduction: where the package does each
# --------------------------------------------------------------------------------------


def _sources():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE).as_posix(), ast.parse(path.read_text())


def test_one_loop_over_a_loader_and_one_seed_policy():
    loops, seeds = set(), set()
    for name, tree in _sources():
        for node in ast.walk(tree):
            looped = node.iter if isinstance(node, (ast.For, ast.comprehension)) else None
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith(LOOP_CALLS):
                looped = node  # a progress bar or an index over the batches
            if looped is not None and "loader" in ast.unparse(looped):
                loops.add(name)
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith(
                ("shared_seed", ".seeded")
            ):
                seeds.add(name)
    assert loops == {"dataset/data_pass.py"}
    assert seeds == {"dataset/data_pass.py"}


def test_one_reduction_over_ranks():
    callers = set()
    for name, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("all_reduce"):
                callers.add(name)
    # the collective itself (distributed.py: bucketed sums, status words, reduce_sums) and
    # the data pass's half-step sums of the data-set optimum
    assert callers == {"dataset/distributed.py", "dataset/data_pass.py"}


def test_no_list_length_stands_for_a_block_type():
    pattern = re.compile(r"len\((block|kfacs|factors|eigen\w+|ls|F)\)\s*[=!<>]=?\s*[12]\b")
    offenders = [
        f"{path.relative_to(PACKAGE)}:{number}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders


def test_a_kept_pass_is_revisited_once_within_its_budget():
    collect = Recorder()
    data = DataPass(collect, batches(), PARAMS, curvature="mc")
    seen = []
    data.keep(1 << 20)
    first = data.run(lambda batch, scale: seen.append(scale), "first")
    assert data.revisit(lambda batch, scale: seen.append(scale), "again") == first
    assert len(collect.draws) == 3 and seen[:3] == seen[3:]  # no second pass over the data
    assert data.passes == 1
    assert data.revisit(lambda batch, scale: None, "once more") == first  # a pass again
    assert len(collect.draws) == 6 and collect.draws[3:] == collect.draws[:3]
    data.run(lambda batch, scale: None, "unkept")
    assert data.revisit(lambda batch, scale: None, "nothing kept") == first
    assert data.passes == 4


class Sized(Recorder):
    """Batches whose terms take ``8·8·4`` bytes each."""

    def __call__(self, X, y, *, with_kfac=False):
        batch = super().__call__(X, y)
        return BatchQuantities(batch.loss, len(X), {}, {"b": _dense(torch.zeros(8, 8))})


@pytest.mark.parametrize("budget", [0, 8 * 8 * 4])
def test_a_pass_over_the_budget_reads_only_the_unkept_batches_again(budget):
    """Kept in order while they fit, the last batch in any case; the rest read again."""
    collect = Sized()
    data = DataPass(collect, batches((3, 1, 4, 2)), PARAMS, curvature="mc", reduction="mean")
    first_seen, again_seen = [], []
    data.keep(budget)
    first = data.run(lambda batch, scale: first_seen.append(batch), "first")
    kept = budget // (8 * 8 * 4) + 1  # batches within the budget, and the last
    again = data.revisit(lambda batch, scale: again_seen.append((batch, scale)), "again")
    assert again == first and data.passes == 2
    # the unread batches collected again under their own Monte-Carlo seeds
    assert len(collect.draws) == 4 + 4 - kept
    unkept = [i for i in range(4) if i >= budget // (8 * 8 * 4) and i != 3]
    assert collect.draws[4:] == [collect.draws[i] for i in unkept]
    # the kept batches are the first pass's own (not collected again), every batch once
    assert {b.num_samples for b, _ in again_seen} == {3, 1, 4, 2}
    assert sum(b is f for b, _ in again_seen for f in first_seen) == kept
    assert sorted(scale for _, scale in again_seen) == [1, 2, 3, 4]


def test_the_last_batch_is_kept_without_holding_the_one_before():
    """While a batch is collected, the batch before it (unkept) is no longer referenced."""
    import gc
    import weakref

    refs = []

    class Tracked(Sized):
        def __call__(self, X, y, *, with_kfac=False):
            gc.collect()
            alive.append(sum(r() is not None for r in refs))
            batch = super().__call__(X, y)
            refs.append(weakref.ref(batch))
            return batch

    alive: list[int] = []
    data = DataPass(Tracked(), batches((3, 1, 4)), PARAMS)
    data.keep(0)
    data.run(lambda batch, scale: None, "first")
    assert alive == [0, 0, 0]
    data.revisit(lambda batch, scale: None, "again")


def _dense(matrix):
    from kfoc_backpack.collect.layer_terms import DenseTerms

    return DenseTerms(DenseBlock(matrix))


@pytest.mark.parametrize("curvature", ["ggn", "mc"])
@pytest.mark.parametrize("structure", ["ekfoc", "ekfac"])
def test_the_correction_replays_the_factors_pass(monkeypatch, structure, curvature):
    """The same ``S`` as a second pass over the data, from one pass."""
    from laplace import Laplace

    from kfoc_backpack.dataset.correction import EigenCorrection, EKFOCFactors

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3), torch.nn.Flatten(), torch.nn.Linear(48, 3)
    )
    X, y = torch.randn(10, 2, 6, 6), torch.randint(0, 3, (10,))
    data = [(X[:6], y[:6]), (X[6:], y[6:])]
    kwargs = {"backend_kwargs": {"stochastic": True}} if curvature == "mc" else {}

    def fit(budget):
        monkeypatch.setattr(EigenCorrection, "replay_memory", budget)
        monkeypatch.setattr(EKFOCFactors, "replay_memory", property(lambda self: budget))
        la = Laplace(model, "classification", "all", structure, **kwargs)
        calls = []
        forward = model.forward
        monkeypatch.setattr(model, "forward", lambda x: calls.append(1) or forward(x))
        torch.manual_seed(1)
        la.fit(data)
        monkeypatch.setattr(model, "forward", forward)
        return la, len(calls)

    kept, kept_calls = fit(1 << 30)
    read, read_calls = fit(0)
    assert read_calls > kept_calls  # the second pass over the data is gone
    for a, b in zip(kept.H_facs.blocks, read.H_facs.blocks):
        for name, tensor in a.tensors().items():
            torch.testing.assert_close(tensor, b.tensors()[name], rtol=1e-12, atol=1e-12)
