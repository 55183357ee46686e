"""Models of the kinds people write, for the hook route's tests and benchmark.

Each is an ``nn.Module`` that BackPACK's second-order route cannot backpropagate
through (custom ``forward``, residual sum, frozen BatchNorm, attention, GELU/SiLU,
adaptive pooling), with only ``Linear``/``Conv2d`` parameters trainable.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class MLP(nn.Module):
    """``fc2(relu(fc1(x)))``."""

    def __init__(self, inputs: int = 4, hidden: int = 6, outputs: int = 3):
        super().__init__()
        self.fc1 = nn.Linear(inputs, hidden)
        self.fc2 = nn.Linear(hidden, outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class ResidualCNN(nn.Module):
    """``h = relu(conv1(x)); h = h + relu(conv2(h))``, pooled, linear head."""

    def __init__(self, channels: int = 3, outputs: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.head = nn.Linear(channels * 2 * 2, outputs)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv1(x))
        h = h + torch.relu(self.conv2(h))
        return self.head(nn.functional.avg_pool2d(h, 3).flatten(1))


class FrozenBatchNormCNN(nn.Module):
    """Conv → in-place ReLU → frozen BatchNorm → conv → pooled linear head."""

    def __init__(self, outputs: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.relu = nn.ReLU(inplace=True)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 3, 2)
        self.head = nn.Linear(3, outputs)
        for p in self.bn.parameters():
            p.requires_grad_(False)
        with torch.no_grad():  # non-trivial running statistics
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.bn(self.relu(self.conv1(x)))
        h = self.conv2(h)
        return self.head(h.mean((2, 3)))


class TransformerClassifier(nn.Module):
    """Token embedding, a ``TransformerEncoderLayer``, mean pooling, linear head.

    Attention and LayerNorm parameters are frozen; the embedding, the feed-forward
    ``Linear`` layers and the head are trainable.
    """

    def __init__(self, inputs: int = 3, width: int = 8, outputs: int = 3, batch_first: bool = True):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(inputs, width)
        self.block = nn.TransformerEncoderLayer(
            width, nhead=2, dim_feedforward=12, dropout=0.0, batch_first=batch_first
        )
        self.head = nn.Linear(width, outputs)
        for module in (self.block.self_attn, self.block.norm1, self.block.norm2):
            for p in module.parameters():
                p.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:  # x: [N, T, inputs]
        h = self.embed(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.block(h)
        return self.head(h.mean(1 if self.batch_first else 0))


def activations_sequential(outputs: int = 3) -> nn.Sequential:
    """An ``nn.Sequential`` with GELU, SiLU and ``AdaptiveAvgPool2d``."""
    return nn.Sequential(
        nn.Conv2d(1, 3, 3),
        nn.GELU(),
        nn.Conv2d(3, 4, 2),
        nn.SiLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, outputs),
    )


class DictModel(nn.Module):
    """Takes Hugging Face style batches ``{"input_ids": X, "labels": y}``."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, batch: dict) -> Tensor:
        return self.inner(batch["input_ids"])


def input_shape(name: str) -> tuple[int, ...]:
    """Shape of one input of the model ``name`` (see :data:`MODELS`)."""
    if name in ("mlp", "mlp_dict"):
        return (4,)
    if name.startswith("transformer"):
        return (5, 3)
    return (1, 6, 6)


MODELS = {
    "mlp": MLP,
    "residual": ResidualCNN,
    "frozen_bn": FrozenBatchNormCNN,
    "transformer": TransformerClassifier,
    "transformer_seq_first": lambda outputs=3: TransformerClassifier(
        outputs=outputs, batch_first=False
    ),
    "activations": activations_sequential,
    "mlp_dict": lambda outputs=3: DictModel(MLP(outputs=outputs)),
}
"""Model name → constructor taking ``outputs``."""
