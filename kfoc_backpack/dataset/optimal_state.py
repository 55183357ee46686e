"""One weight's state during the data-set optimum, and an earlier product as a term.

See :mod:`kfoc_backpack.dataset.optimal`. Index conventions:
:mod:`kfoc_backpack.dataset.options`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kfoc_backpack.blocks import KroneckerBlock
from kfoc_backpack.enums import Aggregation


@dataclass(frozen=True)
class KroneckerTerm:
    """A single product ``L ⊗ R`` with the half-steps of the power method.

    Adds an earlier approximation (of previous data in an online fit) to the target
    of the data-set optimum.

    Attributes:
        left: ``[M, M]``.
        right: ``[N_in, N_in]``.
    """

    left: Tensor
    right: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        """``(M, N_in)``: sizes of the left and right factors."""
        return self.left.shape[-1], self.right.shape[-1]

    @property
    def like(self) -> Tensor:
        """A stored tensor, whose device and dtype the term has."""
        return self.left

    def to_right(self, left: Tensor) -> Tensor:
        """``⟨L₀, L⟩ R₀``."""
        return (self.left * left).sum() * self.right

    def to_left(self, right: Tensor) -> Tensor:
        """``⟨R₀, R⟩ L₀``."""
        return (self.right * right).sum() * self.left


def normalized(mat: Tensor) -> tuple[Tensor, Tensor]:
    """``(mat / ‖mat‖_F, ‖mat‖_F)``; a zero matrix stays zero."""
    norm = torch.linalg.matrix_norm(mat)
    return mat / torch.where(norm > 0, norm, torch.ones_like(norm)), norm


class WeightState:
    """Book-keeping of one weight during the data-set optimum."""

    def __init__(self, zero: KroneckerBlock, init: Tensor | None):
        self.zero = zero
        self.running = zero.new_sum(Aggregation.RUNNING) if init is None else None
        self.left: Tensor | None = None if init is None else normalized(init)[0]
        self.right: Tensor | None = None
        self.acc: Tensor | None = None
        self.terms: list = []
        self.scales: list[float] = []
        self.trace_sum: Tensor | float = 0.0
        self.prior: KroneckerTerm | None = None
        self.converged = False
        self.iterations = 0
        self.exponents = (0, 0)  # the terms are iterated as G·2^e_out, A·2^e_in

    def add(self, term: Tensor) -> None:
        """Add ``term`` to the half-step sum being accumulated."""
        self.acc = term if self.acc is None else self.acc + term

    def take(self, zeros: Tensor | None = None) -> Tensor:
        """Return the accumulated sum; ``zeros`` where only other ranks saw terms."""
        acc, self.acc = self.acc, None
        if acc is not None:
            return acc
        if zeros is None:  # the layer saw no data (all-zero block)
            raise RuntimeError("K-FOC: a weight received no per-sample terms in a pass.")
        return zeros

    def zeros(self, right: bool) -> Tensor:
        """Return an all-zero half-step sum: ``[N, N]`` (right half-step) or ``[M, M]``."""
        return torch.zeros_like(self.zero.right if right else self.zero.left)

    def start(self) -> KroneckerBlock:
        """Return the running start (K-FAC's split)."""
        return self.running.result()  # type: ignore[union-attr]
