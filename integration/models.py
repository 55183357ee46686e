"""Models of the paper's experiment and their (short, seeded) training.

* :func:`mlp` — one hidden layer of 50 ReLU units, as in Hernández-Lobato & Adams
  (2015) for the UCI regression sets; layers ``layer1`` (``in → 50``) and ``layer2``
  (``50 → 1``).
* :func:`lenet5` — LeNet-5 for ``28 × 28`` inputs (``conv1``: 1→6, 5×5, padding 2;
  ``conv2``: 6→16, 5×5; max pooling; 400→120→84→10).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from data import INPUT_SHAPES, TASKS, Dataset
from torch import Tensor, nn

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


def mlp(in_features: int, hidden: int = 50, activation: str = "relu") -> nn.Sequential:
    """One-hidden-layer MLP ``in → hidden → 1`` (ReLU unless ``activation`` says else)."""
    act = ACTIVATIONS[activation]()
    return nn.Sequential(nn.Linear(in_features, hidden), act, nn.Linear(hidden, 1))


def lenet5(num_classes: int = 10) -> nn.Sequential:
    """LeNet-5 for ``[N, 1, 28, 28]`` inputs (ReLU, max pooling)."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, num_classes),
    )


MLP_LAYERS = {"layer1": 0, "layer2": 2}
LENET_LAYERS = {"conv1": 0, "conv2": 3}


def make_model(data: Dataset, activation: str = "relu") -> tuple[nn.Sequential, dict[str, int]]:
    """Return the paper's model for a data set and the indices of its analysed layers.

    ``activation`` (``relu``, ``tanh``, ``sigmoid``) applies to the MLPs only: the paper
    does not state it, and the diagnostic ``--activation`` measures its effect.
    """
    return _paper_model(data.task, data.inputs.shape[1], activation)


def _paper_model(
    task: str, in_features: int, activation: str = "relu"
) -> tuple[nn.Sequential, dict[str, int]]:
    if task == "classification":
        return lenet5(), dict(LENET_LAYERS)
    return mlp(in_features, activation=activation), dict(MLP_LAYERS)


def describe_layer(module: nn.Module) -> str:
    """Short description of a layer's weight: ``"Linear 13→50"``, ``"Conv2d 6→16, 5×5"``.

    Other modules are described by their class name.
    """
    if isinstance(module, nn.Linear):
        return f"Linear {module.in_features}→{module.out_features}"
    if isinstance(module, nn.Conv2d):
        kernel = "×".join(str(k) for k in module.kernel_size)
        return f"Conv2d {module.in_channels}→{module.out_channels}, {kernel}"
    return type(module).__name__


def describe_layers(model: nn.Sequential, layers: dict[str, int]) -> dict[str, str]:
    """:func:`describe_layer` of each analysed layer (``name → index`` in ``model``)."""
    return {name: describe_layer(model[index]) for name, index in layers.items()}


def paper_layers(dataset: str) -> dict[str, str]:
    """Descriptions of the analysed layers of a data set's model, without loading it.

    The shapes come from :data:`integration.data.INPUT_SHAPES` and
    :data:`integration.data.TASKS` (e.g. Boston:
    ``{"layer1": "Linear 13→50", "layer2": "Linear 50→1"}``).

    The global random state is left as it was.

    Raises:
        KeyError: For a data set not in :data:`integration.data.INPUT_SHAPES`.
    """
    with torch.random.fork_rng(devices=[]):  # leave the global random state alone
        model, layers = _paper_model(TASKS[dataset], INPUT_SHAPES[dataset][0])
    return describe_layers(model, layers)


def make_loss(data: Dataset, reduction: str = "mean") -> nn.Module:
    """MSE for regression, cross-entropy for classification."""
    if data.task == "classification":
        return nn.CrossEntropyLoss(reduction=reduction)
    return nn.MSELoss(reduction=reduction)


@dataclass(frozen=True)
class TrainConfig:
    """Adam training schedule.

    Attributes:
        epochs: Passes over the data.
        batch_size: Mini-batch size.
        lr: Adam's learning rate.
    """

    epochs: int
    batch_size: int
    lr: float = 1e-3


def train(
    model: nn.Module, data: Dataset, config: TrainConfig, seed: int, device: str = "cpu"
) -> float:
    """Train ``model`` in place with Adam; return the final training loss (full data).

    Args:
        model: The model (on ``device``).
        data: The training data.
        config: The schedule.
        seed: Seed of the shuffling.
        device: Device of the model.
    """
    loss_fn = make_loss(data)
    inputs, targets = data.inputs.to(device), data.targets.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(data), generator=generator).to(device)
        for start in range(0, len(data), config.batch_size):
            index = order[start : start + config.batch_size]
            optimizer.zero_grad()
            loss_fn(model(inputs[index]), targets[index]).backward()
            optimizer.step()
    return evaluate(model, data, device)


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, device: str = "cpu") -> float:
    """Mean training loss of ``model`` on ``data``."""
    outputs: Tensor = model(data.inputs.to(device))
    return float(make_loss(data)(outputs, data.targets.to(device)))
