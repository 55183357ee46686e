"""One rank of the gloo process group that tests/test_distributed.py starts.

Usage: ``python tests/distributed_worker.py RANK WORLD PORT SCENARIO OUT_DIR``. Writes
``OUT_DIR/rank{RANK}.pt`` with what the scenario computed on this rank.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import torch
from torch import distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import distributed_cases as cases  # noqa: E402
from backpack import backpack  # noqa: E402

from kfoc_backpack import (  # noqa: E402
    KFOCAccumulator,
    KFOCLaplace,
    optimal_factors,
)
from kfoc_backpack.extensions import KFOCTerms, extended  # noqa: E402
from kfoc_backpack.extensions.lifetime import preserved_grads  # noqa: E402

AGGREGATIONS = ("optimal", "approx", "running")


def laplace_fits(arch: str, rank: int, world: int) -> dict:
    """KFOCLaplace (hook route, exact GGN) on this rank's shard, every aggregation."""
    out = {}
    data = cases.shard(arch, rank, world)
    for aggregation in AGGREGATIONS:
        for store in (True, False) if aggregation == "optimal" else (None,):
            la = cases.fit_laplace(arch, data, aggregation, store)
            out[(aggregation, store)] = {
                "kfacs": [[f.clone() for f in block] for block in la.H_facs.kfacs],
                "loss": float(la.loss),
                "n_data": la.n_data,
                "communication": la.communication,
            }
    return out


def last_layer_fits(rank: int, world: int) -> dict:
    """KFOCLLLaplace on the MLP's last layer (named, so an empty shard needs no batch)."""
    out = {}
    data = cases.shard("mlp", rank, world)
    for aggregation in ("optimal", "approx"):
        la = cases.fit_laplace("mlp", data, aggregation, last_layer_name="2")
        out[aggregation] = {
            "kfacs": [[f.clone() for f in block] for block in la.H_facs.kfacs],
            "loss": float(la.loss),
            "n_data": la.n_data,
        }
    return out


def online_fits(rank: int, world: int) -> dict:
    """KFOCLaplace fitted on the first half of each shard, then updated with the rest."""
    out = {}
    first, second = cases.halves(cases.shard("mlp", rank, world))
    for aggregation in ("optimal", "approx"):
        la = cases.fit_laplace("mlp", first, aggregation)
        la.fit(second, override=False)
        out[aggregation] = {
            "kfacs": [[f.clone() for f in block] for block in la.H_facs.kfacs],
            "n_data": la.n_data,
        }
    return out


def subgroup_fit(rank: int, world: int) -> dict | None:
    """optimal_factors over the group of the last two ranks only (exact GGN)."""
    members = [world - 2, world - 1]
    group = dist.new_group(members)  # every rank takes part in creating it
    if rank not in members:
        return None
    data = cases.shard("mlp", rank, world)
    result = optimal_factors(
        cases.make_model("mlp"),
        cases.loss_for("mlp"),
        data,
        tol=1e-12,
        max_passes=400,
        process_group=group,
    )
    return {"factors": result.factors, "num_samples": result.num_samples}


def monte_carlo_fits(rank: int, world: int) -> dict:
    """KFOCLaplace with the Monte-Carlo Fisher, twice from the same global seed."""
    out = {}
    data = cases.shard("mlp", rank, world)
    for aggregation in AGGREGATIONS:
        runs = []
        for _ in range(2):
            torch.manual_seed(123)
            la = KFOCLaplace(
                cases.make_model("mlp"),
                "classification",
                aggregation=aggregation,
                backend_kwargs={"stochastic": True},
            )
            la.fit(data)
            runs.append([[f.clone() for f in block] for block in la.H_facs.kfacs])
        out[aggregation] = runs
    return out


def corrected_fits(rank: int, world: int) -> dict:
    """EKFOCLaplace (``"running"``) and EKFACLaplace on this rank's shard; MC twice."""
    from laplace import Laplace

    out = {}
    for arch in ("mlp", "cnn"):
        data = cases.shard(arch, rank, world)
        for structure in ("ekfoc", "ekfac"):
            la = Laplace(cases.make_model(arch), "classification", "all", structure)
            la.fit(data)
            out[(arch, structure)] = {
                "vectors": [[q.clone() for q in v] for v in la.H.eigenvectors],
                "values": [[s.clone() for s in v] for v in la.H.eigenvalues],
                "n_data": la.n_data,
            }
    runs = []
    # twice as given, then with rank 0 keeping only its last batch and reading the
    # others again while the other ranks keep all of theirs
    for max_memory in (None, None, 0 if rank == 0 else 1 << 30):
        torch.manual_seed(321)
        kwargs = {} if max_memory is None else {"max_memory": max_memory}
        la = Laplace(
            cases.make_model("mlp"),
            "classification",
            "all",
            "ekfoc",
            backend_kwargs={"stochastic": True},
            **kwargs,
        )
        la.fit(cases.shard("mlp", rank, world))
        runs.append([s[0].clone() for s in la.H.eigenvalues])
    out["monte_carlo"] = runs
    return out


def replayed_terms(arch: str, rank: int, world: int) -> list[tuple[int, dict]]:
    """This rank's per-batch quantities under the labels its MC fits draw."""
    model, lossfunc = cases.make_model(arch), cases.loss_for(arch)
    params = dict(model.named_parameters())
    result = []
    for index, (X, y) in enumerate(cases.shard(arch, rank, world)):
        ext = KFOCTerms("mc")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cases.MC_SEED + index + rank * cases.RANK_SEED_STRIDE)
            with preserved_grads(params.values()), extended(model, lossfunc):
                with backpack(ext):
                    lossfunc(model(X), y).backward()
        quantities = {name: getattr(p, ext.savefield) for name, p in params.items()}
        for p in params.values():
            delattr(p, ext.savefield)
        result.append((len(X), quantities))
    return result


def backpack_fits(arch: str, rank: int, world: int) -> dict:
    """optimal_factors and KFOCAccumulator with the Monte-Carlo Fisher."""
    out = {}
    data = cases.shard(arch, rank, world)
    for store in (True, False):
        result = optimal_factors(
            cases.make_model(arch),
            cases.loss_for(arch),
            data,
            curvature="mc",
            seed=cases.MC_SEED,
            tol=1e-12,
            max_passes=400,
            store_terms=store,
        )
        out[("optimal", store)] = result
    replay = replayed_terms(arch, rank, world)
    out["replay"] = replay
    reduction = cases.loss_for(arch).reduction
    for aggregation in ("approx", "running"):
        model = cases.make_model(arch)
        acc = KFOCAccumulator(model, aggregation=aggregation, reduction=reduction)
        for num, quantities in replay:  # the per-batch K-FOC factors of the replayed terms
            for name, param in model.named_parameters():
                value = quantities[name]
                # a savefield as KFOC writes it: [L_out, R_in] or [B]
                param.kfoc = list(value.kfoc(value.solve())) if hasattr(value, "solve") else value
            acc.update(num)
        out[(aggregation, None)] = acc.factors()
    return out


def fits(rank: int, world: int) -> dict:
    """Every fit of the test on this rank's shard."""
    result = {
        arch: {
            "laplace": laplace_fits(arch, rank, world),
            "backpack": backpack_fits(arch, rank, world),
        }
        for arch in ("mlp", "cnn")
    }
    result["residual"] = {"laplace": laplace_fits("residual", rank, world)}
    result["last_layer"] = last_layer_fits(rank, world)
    result["monte_carlo"] = monte_carlo_fits(rank, world)
    result["online"] = online_fits(rank, world)
    result["subgroup"] = subgroup_fit(rank, world)
    result["corrected"] = corrected_fits(rank, world)
    return result


class FailingLoader:
    """Rank 1's shard, raising at its second batch."""

    def __init__(self, data):
        self.data = data

    def __iter__(self):
        for index, batch in enumerate(self.data):
            if index == 1:
                raise RuntimeError("loader broke on purpose")
            yield batch


def faults(rank: int, world: int) -> dict:
    """A rank raising mid-fit, and ranks holding different models."""
    out = {}
    data = cases.shard("mlp", rank, world)
    for aggregation in AGGREGATIONS:
        la = KFOCLaplace(cases.make_model("mlp"), "classification", aggregation=aggregation)
        try:
            la.fit(FailingLoader(data) if rank == 1 else data)
        except Exception as exc:  # noqa: BLE001 - recorded for the test
            out[("raises", aggregation)] = (type(exc).__name__, str(exc))
    model = cases.make_model("mlp", hidden=7 if rank == 0 else 8)
    try:
        optimal_factors(model, cases.loss_for("mlp"), data)
    except Exception as exc:  # noqa: BLE001 - recorded for the test
        out["mismatch"] = (type(exc).__name__, str(exc))
    return out


def main() -> None:
    rank, world, port = (int(v) for v in sys.argv[1:4])
    scenario, out_dir = sys.argv[4], Path(sys.argv[5])
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=120),
    )
    try:
        result = {"fits": fits, "faults": faults}[scenario](rank, world)
        torch.save(result, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
