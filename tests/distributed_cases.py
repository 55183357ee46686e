"""Shared by tests/test_distributed.py and the ranks it starts (tests/distributed_worker.py).

Small float64 problems whose shards are uneven or empty; batches of 4 (uneven last
batches). Every rank builds the same data and model from fixed seeds and keeps its
shard; the test builds the same data to compute the single-process reference.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.nn import functional as F

NUM_DATA = 22
BATCH = 4
SHARDS = {2: (15, 7), 3: (9, 0, 13)}
"""Shard sizes per world size: uneven, and an empty shard for three ranks."""

MC_SEED = 7
"""Base seed of the Monte-Carlo labels of the BackPACK-route fits."""

RANK_SEED_STRIDE = 1 << 32


class ResidualNet(nn.Module):
    """A model as users write it: a residual sum, GELU, BatchNorm (eval mode), parameters
    of its own (a shift and a mixing matrix), dict batches; everything trainable."""

    def __init__(self, hidden: int = 7):
        super().__init__()
        self.inp = nn.Linear(5, hidden)
        self.norm = nn.BatchNorm1d(hidden)
        self.block = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 3)
        self.shift = nn.Parameter(0.1 * torch.randn(hidden))
        self.mix = nn.Parameter(torch.eye(hidden) + 0.1 * torch.randn(hidden, hidden))
        with torch.no_grad():
            self.norm.running_mean.uniform_(-0.5, 0.5)
            self.norm.running_var.uniform_(0.5, 2.0)
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, batch: Mapping[str, Tensor] | Tensor) -> Tensor:
        x = batch["input_ids"] if isinstance(batch, Mapping) else batch
        h = F.gelu(self.inp(x)) + self.shift
        h = h + F.gelu(self.block(self.norm(h))) @ self.mix
        return self.out(h)


def make_model(arch: str, hidden: int = 7) -> nn.Module:
    """The same float64 model on every rank (``hidden`` differs only in the fault case)."""
    torch.manual_seed(0)
    if arch == "mlp":
        model = nn.Sequential(nn.Linear(5, hidden), nn.Tanh(), nn.Linear(hidden, 3))
    elif arch == "residual":
        model = ResidualNet(hidden).eval()
    else:
        model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    return model.double()


def make_data(arch: str) -> tuple[Tensor, Tensor]:
    """All ``NUM_DATA`` inputs and class labels."""
    gen = torch.Generator().manual_seed(1)
    shape = (NUM_DATA, 2, 6, 6) if arch == "cnn" else (NUM_DATA, 5)
    X = torch.randn(*shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (NUM_DATA,), generator=gen)
    return X, y


def batches(X: Tensor, y: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Batches of ``BATCH`` (the last one shorter)."""
    return [(X[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(X), BATCH)]


def shard(arch: str, rank: int, world: int) -> list[tuple[Tensor, Tensor]]:
    """Rank ``rank``'s batches."""
    X, y = make_data(arch)
    sizes = SHARDS[world]
    start = sum(sizes[:rank])
    data = batches(X[start : start + sizes[rank]], y[start : start + sizes[rank]])
    if arch == "residual":  # dict batches, as laplace-torch takes them from tokenisers
        return [{"input_ids": X, "labels": y} for X, y in data]
    return data


def halves(data: list) -> tuple[list, list]:
    """The first half of a shard's batches (rounded up) and the rest."""
    cut = (len(data) + 1) // 2
    return data[:cut], data[cut:]


def all_shards(arch: str, world: int) -> list[list[tuple[Tensor, Tensor]]]:
    """Every rank's batches, in rank order (their concatenation is the reference data)."""
    return [shard(arch, r, world) for r in range(world)]


def fit_laplace(arch: str, data: list, aggregation: str, store: bool | None = None, **kwargs):
    """A ``KFOCLaplace`` (or, with ``last_layer_name``, ``KFOCLLLaplace``) fitted on ``data``."""
    from kfoc_backpack import KFOCLaplace, KFOCLLLaplace

    cls = KFOCLLLaplace if "last_layer_name" in kwargs else KFOCLaplace
    options = {"tol": 1e-12, "max_passes": 400, "store_terms": store}
    la = cls(make_model(arch), "classification", aggregation=aggregation, **options, **kwargs)
    la.fit(data)
    return la


def loss_for(arch: str) -> nn.Module:
    """Mean reduction for the MLP, sum for the CNN: both scalings are covered."""
    return nn.CrossEntropyLoss(reduction="mean" if arch == "mlp" else "sum")
