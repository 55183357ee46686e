r"""laplace-torch's ``Kron``/``KronDecomposed`` interface over typed blocks.

The Laplace classes of this package present laplace-torch's interface — ``la.H_facs`` a
``Kron``, ``la.H`` and ``la.posterior_precision`` a ``KronDecomposed`` — so that code
written against a ``KronLaplace`` keeps working. What they hold are the fit's typed blocks
(:mod:`kfoc_backpack.blocks`), and each block answers the posterior's questions itself:

* :class:`BlockKron` — the blocks times laplace-torch's likelihood factor; ``kfacs`` is
  laplace-torch's list view (``[L, R]`` or ``[B]`` per parameter); ``decompose`` asks
  every block for its eigenform;
* :class:`BlockDecomposed` — the eigenforms with a prior precision ``δ`` per block:
  ``logdet``, ``bmm``/``inv_square_form`` at any exponent, ``diag``, ``to_matrix``,
  scalar multiples and added priors, ``damping`` kept through the arithmetic (which
  laplace-torch's own ``KronDecomposed`` drops).

Index conventions: ``B·K`` rows of the matrices multiplied, ``P`` parameters.
"""

from __future__ import annotations

import torch
from laplace.utils import Kron, KronDecomposed
from torch import Tensor

from kfoc_backpack.blocks import Block, Decomposed


def _is_scalar(value: object) -> bool:
    if isinstance(value, Tensor):
        return value.ndim == 0 or (value.ndim == 1 and len(value) == 1)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class BlockKron(Kron):
    """laplace-torch's ``Kron`` of typed blocks.

    Args:
        blocks: Per parameter (laplace-torch's order), its block.
    """

    def __init__(self, blocks: list[Block]):
        self.blocks = list(blocks)

    @property
    def kfacs(self) -> list[list[Tensor]]:  # type: ignore[override]
        """laplace-torch's view: per parameter ``[L, R]`` or ``[B]``."""
        return [list(block.kfacs) for block in self.blocks]

    def __len__(self) -> int:
        return len(self.blocks)

    def __mul__(self, scalar: Tensor | float) -> BlockKron:
        """Every block times ``scalar``, spread evenly over a block's factors (as ``Kron``)."""
        if not _is_scalar(scalar):
            raise ValueError("Input not valid python or torch scalar.")
        return BlockKron([block.scaled(scalar, even=True) for block in self.blocks])

    __rmul__ = __mul__

    def decompose(self, damping: bool = False) -> BlockDecomposed:
        """Every block's eigenform (``damping``: see :class:`BlockDecomposed`)."""
        return BlockDecomposed(
            [block.decompose(f"block {index}") for index, block in enumerate(self.blocks)],
            damping=damping,
        )


class BlockDecomposed(KronDecomposed):
    """laplace-torch's ``KronDecomposed`` of typed eigenforms.

    Args:
        blocks: Per parameter, its :class:`~kfoc_backpack.blocks.Decomposed` eigenform.
        deltas: Per-block (or one) addend, e.g. the prior precision; default zero.
        damping: laplace-torch's ``damping``: ``√δ`` added to each Kronecker factor's
            eigenvalues instead of ``δ`` to their products.

    Raises:
        ValueError: For ``damping=True`` with blocks that have no factor eigenvalues
            (eigenvalue-corrected blocks), or deltas that fit neither one nor every block.
    """

    def __init__(
        self, blocks: list[Decomposed], deltas: Tensor | None = None, damping: bool = False
    ):
        for block in blocks:
            block.check_damping(damping)
        self.blocks = list(blocks)
        like = self.blocks[0].eigenvectors[0]
        if deltas is None:
            deltas = torch.zeros(len(self.blocks), device=like.device, dtype=like.dtype)
        else:
            self._check_deltas(deltas)
        self.deltas = deltas
        self.damping = damping

    @property
    def eigenvectors(self) -> list[list[Tensor]]:  # type: ignore[override]
        """laplace-torch's view: per block ``[Q_L, Q_R]`` or ``[Q]``."""
        return [block.eigenvectors for block in self.blocks]

    @property
    def eigenvalues(self) -> list[list[Tensor]]:  # type: ignore[override]
        """laplace-torch's view: per block ``[λ_L, λ_R]``, ``[S]`` or ``[λ]``."""
        return [block.eigenvalues for block in self.blocks]

    def __len__(self) -> int:
        return len(self.blocks)

    def _check_deltas(self, deltas: Tensor) -> None:
        """Accept a scalar or one value per block (a prior precision), naming the others."""
        if isinstance(deltas, Tensor) and (
            deltas.ndim == 0 or (deltas.ndim == 1 and len(deltas) in (1, len(self)))
        ):
            return
        shape = tuple(deltas.shape) if isinstance(deltas, Tensor) else type(deltas).__name__
        raise ValueError(
            f"{type(self).__name__}: cannot add {shape} to {len(self)} blocks; a "
            "Kronecker-factored posterior takes a scalar prior precision or one per "
            "parameter block (prior_structure='scalar' or 'layerwise'), not one per "
            "parameter ('diag')."
        )

    def detach(self) -> BlockDecomposed:
        """Detach the deltas (the blocks hold no graph)."""
        self.deltas = self.deltas.detach()
        return self

    def __add__(self, deltas: Tensor) -> BlockDecomposed:
        """Add a scalar, or one scalar per block, to every block (``damping`` kept)."""
        self._check_deltas(deltas)
        return BlockDecomposed(self.blocks, self.deltas + deltas, self.damping)

    def __mul__(self, scalar: Tensor | float) -> BlockDecomposed:
        """Multiply every block (not the deltas) by a scalar."""
        if not _is_scalar(scalar):
            raise ValueError("Invalid argument, can only multiply Kron with scalar.")
        blocks = [block.scaled(scalar) for block in self.blocks]
        return BlockDecomposed(blocks, self.deltas, self.damping)

    __radd__ = __add__
    __rmul__ = __mul__

    def _per_block(self) -> list[tuple[Decomposed, Tensor]]:
        return list(zip(self.blocks, self.deltas.expand(len(self.blocks))))

    def logdet(self) -> Tensor:
        """``log det(H + δ) = Σ_blocks log det(block + δ)``."""
        return sum(block.logdet(delta, self.damping) for block, delta in self._per_block())

    def _bmm(self, W: Tensor, exponent: float = -1) -> Tensor:
        """``(H + δ)^exponent W`` for ``W`` of shape ``[B, K, P]``, block by block."""
        if W.ndim != 3:
            raise ValueError(f"W must be [batch, outputs, parameters], got {tuple(W.shape)}.")
        batch, outputs, params = W.shape
        sizes = [block.size for block in self.blocks]
        if sum(sizes) != params:
            raise ValueError(f"W has {params} parameters, the blocks {sum(sizes)}.")
        rows = W.reshape(batch * outputs, params)
        parts = [
            block.bmm(part, delta, exponent, self.damping)
            for (block, delta), part in zip(self._per_block(), rows.split(sizes, dim=1))
        ]
        return torch.cat(parts, dim=1).reshape(batch, outputs, params)

    def diag(self, exponent: float = 1) -> Tensor:
        """``[P]`` diagonal of ``(H + δ)^exponent``, block by block."""
        return torch.cat(
            [block.diag(delta, exponent, self.damping) for block, delta in self._per_block()]
        )

    def to_matrix(self, exponent: float = 1) -> Tensor:
        """Dense ``(H + δ)^exponent`` (block-diagonal; for small models and tests)."""
        return torch.block_diag(
            *[block.to_matrix(delta, exponent, self.damping) for block, delta in self._per_block()]
        )
