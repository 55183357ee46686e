r"""What every curvature block is: a parameter's block, its sum over batches, its eigenform.

A fit produces one :class:`Block` per trainable parameter — the structure of its
approximation (a weight's Kronecker product, a bias's dense block, an
eigenvalue-corrected weight). The data-set level adds blocks batch by batch in the
block's own :class:`BlockSum` and combines the sums of ``torch.distributed`` ranks in
one reduction; the posterior asks the block's :class:`Decomposed` eigenform for its
log-determinant, matrix powers and diagonal with a prior precision ``δ`` added.

Index conventions: ``P`` the parameter's number of entries (the block is ``P × P``),
``R`` rows of a matrix multiplied with the block, ``W`` ranks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Protocol

import torch
from torch import Tensor

from kfoc_backpack.enums import Aggregation, Grouped


class Jacobian(Protocol):
    """A parameter's output Jacobian for ``C`` outputs of ``N`` inputs, in its own form.

    :mod:`kfoc_backpack.collect.jacobians` has the forms: rows, or a weight's factors
    over its positions.
    """

    def rows(self) -> Tensor:
        """Return ``[C, N, P]``: the Jacobian's rows in the parameter's ``vec`` order."""
        ...

    def rotated(self, left_basis: Tensor, right_basis: Tensor) -> Tensor:
        """Return ``[C, N, O, I]``: each row as an ``O × I`` matrix ``J``, ``Q_Lᵀ J Q_R``."""
        ...


def output_products(rows: Tensor, solved: Tensor, joint: bool = False) -> Tensor:
    """``Σ_p rows[·, p] solved[·, p]`` between the outputs of each input, or of all inputs.

    Args:
        rows: ``[C, N, P]``.
        solved: ``[C, N, P]``.
        joint: Every pair of (input, output) rows, input-major, instead of the pairs of
            outputs of each input.

    Returns:
        ``[N, C, C]``, or ``[N·C, N·C]`` with ``joint``.
    """
    if not joint:
        return torch.einsum("cnp,dnp->ncd", rows, solved)
    outputs, num, size = rows.shape
    flat_rows = rows.transpose(0, 1).reshape(num * outputs, size)
    flat_solved = solved.transpose(0, 1).reshape(num * outputs, size)
    return flat_rows @ flat_solved.T


class Decomposed(ABC):
    """A block in eigenform: the posterior's questions for a prior precision ``δ`` added.

    ``δ`` is a 0-d tensor (the block's share of a scalar or per-layer prior); ``damping``
    is laplace-torch's ``KronLaplace(damping=True)``: ``√δ`` added to each Kronecker
    factor's eigenvalues instead of ``δ`` to their products (only blocks with factors
    take it).
    """

    size: int
    """``P``: the parameter's number of entries."""

    @property
    @abstractmethod
    def eigenvectors(self) -> list[Tensor]:
        """laplace-torch's ``KronDecomposed.eigenvectors`` entry of the block."""

    @property
    @abstractmethod
    def eigenvalues(self) -> list[Tensor]:
        """laplace-torch's ``KronDecomposed.eigenvalues`` entry of the block."""

    @abstractmethod
    def spectrum(self, delta: Tensor, exponent: float = 1, damping: bool = False) -> Tensor:
        """``(eigenvalues + δ)^exponent`` in the layout :meth:`rotate` uses."""

    @abstractmethod
    def rotate(self, rows: Tensor) -> Tensor:
        """``[R, P]`` rows in the eigenbasis (``Qᵀ w`` per row), in the spectrum's layout."""

    @abstractmethod
    def unrotate(self, rotated: Tensor) -> Tensor:
        """Inverse of :meth:`rotate`: back to ``[R, P]`` rows (``Q v`` per row)."""

    @abstractmethod
    def basis(self) -> Tensor:
        """Return the dense ``[P, P]`` eigenbasis (small blocks and tests)."""

    @abstractmethod
    def scaled(self, factor: Tensor | float) -> Decomposed:
        """Return the block times a scalar (laplace-torch's ``KronDecomposed * factor``)."""

    def check_damping(self, damping: bool) -> None:  # noqa: B027 - most blocks take it
        """Refuse ``damping=True`` where the block has no factor eigenvalues (default: fine)."""

    def logdet(self, delta: Tensor, damping: bool = False) -> Tensor:
        """``log det(B + δ)``."""
        return self.spectrum(delta, 1, damping).log().sum()

    def bmm(self, rows: Tensor, delta: Tensor, exponent: float, damping: bool = False) -> Tensor:
        """``[R, P]``: each row times ``(B + δ)^exponent``."""
        rotated = self.rotate(rows) * self.spectrum(delta, exponent, damping)
        return self.unrotate(rotated)

    def output_covariance(
        self, jacobian: Jacobian, delta: Tensor, damping: bool = False, joint: bool = False
    ) -> Tensor:
        """Return the parameter's share ``J (B + δ)⁻¹ Jᵀ`` of the output covariance.

        Args:
            jacobian: The parameter's output Jacobian for ``C`` outputs of ``N`` inputs.
            delta: The prior precision added to the block.
            damping: laplace-torch's ``damping``.
            joint: Between all inputs' outputs, not only each input's own.

        Returns:
            ``[N, C, C]``, or ``[N·C, N·C]`` (input-major) with ``joint``.
        """
        rows = jacobian.rows()
        outputs, num, size = rows.shape
        solved = self.bmm(rows.reshape(-1, size), delta, -1, damping)
        return output_products(rows, solved.reshape(outputs, num, size), joint)

    def to_matrix(self, delta: Tensor, exponent: float = 1, damping: bool = False) -> Tensor:
        """Dense ``(B + δ)^exponent``, ``[P, P]`` (small blocks and tests)."""
        basis = self.basis()
        return (basis * self.spectrum(delta, exponent, damping).flatten()) @ basis.T

    @abstractmethod
    def diag(self, delta: Tensor, exponent: float = 1, damping: bool = False) -> Tensor:
        """``[P]`` diagonal of ``(B + δ)^exponent``, without forming it."""


class Block(ABC):
    """One parameter's curvature block in the structure of its approximation.

    Blocks are immutable: every operation returns a new block. The block of a parameter
    with ``P`` entries approximates a ``P × P`` matrix; its entries follow the
    parameter's row-major ``vec``.
    """

    kind: ClassVar[str]
    """Name of the block's structure in a state dict."""

    registry: ClassVar[dict[str, type[Block]]] = {}
    """Block classes by :attr:`kind` (for :meth:`from_state`)."""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            Block.registry[cls.kind] = cls

    @property
    @abstractmethod
    def size(self) -> int:
        """``P``: the parameter's number of entries."""

    @property
    @abstractmethod
    def kfacs(self) -> list[Tensor]:
        """laplace-torch's ``Kron.kfacs`` entry: ``[L, R]`` (Kronecker factors) or ``[B]``."""

    @abstractmethod
    def tensors(self) -> dict[str, Tensor]:
        """Return the tensors that define the block, by name (its state)."""

    def from_kfacs(self, kfacs: object, what: str = "the block") -> Block:
        """Return a block of this structure and shape from laplace-torch's/BackPACK's list layout.

        Args:
            kfacs: ``[L, R]`` for Kronecker factors, ``[B]`` for a dense block (as
                :attr:`kfacs` gives them).
            what: The parameter, for the error.

        Raises:
            ValueError: For anything but tensors of this block's :attr:`kfacs` shapes.
        """
        expected = [tuple(t.shape) for t in self.kfacs]
        shapes = None
        if isinstance(kfacs, (list, tuple)) and all(isinstance(t, Tensor) for t in kfacs):
            shapes = [tuple(t.shape) for t in kfacs]
        if shapes != expected:
            got = shapes if shapes is not None else type(kfacs).__name__
            raise ValueError(
                f"{what}: expected {type(self).__name__}'s {len(expected)} matrices of shapes "
                f"{expected}, got {got}."
            )
        return type(self).from_tensors(dict(zip(self.tensors(), kfacs)))

    @abstractmethod
    def scaled(self, factor: Tensor | float, even: bool = False) -> Block:
        """Return the block times ``factor``.

        Args:
            factor: A non-negative scalar.
            even: For Kronecker factors, spread ``factor`` evenly over the factors
                (laplace-torch's ``Kron * factor``) instead of keeping K-FAC's split
                (the input-side factor's trace is the data's; ``factor`` goes to the
                output side).
        """

    @abstractmethod
    def decompose(self, what: str = "the block") -> Decomposed:
        """Return the block's eigenform (:class:`Decomposed`)."""

    @abstractmethod
    def new_sum(self, aggregation: Aggregation) -> BlockSum:
        """Return an empty sum of blocks of this structure (this block gives the shapes)."""

    @abstractmethod
    def dense(self) -> Tensor:
        """Return the block as a dense ``[P, P]`` matrix (small layers and tests)."""

    def corrected_basis(self, what: str = "the block") -> Block | None:
        """Return the block's eigenbasis with zero eigenvalues, to be corrected by the data.

        ``None`` for blocks that are exact already (nothing to correct).
        """
        return None

    def with_structure(self, grouped: Grouped) -> Block:
        """Return this (zero) block in a grouped weight's structure ``grouped``.

        Only a grouped convolution's per-group zero
        (:class:`~kfoc_backpack.blocks.GroupedKroneckerBlock`) changes: to the zero
        ``L ⊗ R`` over all rows where ``grouped`` couples the groups. Every other block
        is itself.
        """
        return self

    def uncorrected(self) -> Block:
        """Return the block an eigenvalue correction started from (the block itself if none)."""
        return self

    def input_scaled(self, ratio: float) -> Block:
        """Return the block with its input-side factor times ``ratio`` (blocks without: itself).

        laplace-torch's per-batch ``kron`` gives each weight's input-side factor the
        share ``n/N`` of the batch's inputs, so that factor-wise sums over batches
        approximate the data set.
        """
        return self

    def trace(self) -> Tensor:
        """``tr B``."""
        return self.dense().diagonal().sum()

    def to(self, dtype: torch.dtype | None = None, device: torch.device | None = None) -> Block:
        """Return the block with its tensors in ``dtype`` and on ``device``."""
        tensors = {name: t.to(device=device, dtype=dtype) for name, t in self.tensors().items()}
        return type(self).from_tensors(tensors)

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> Block:
        """Return the block from :meth:`tensors`' output."""
        return cls(**tensors)

    def state(self) -> dict[str, object]:
        """Return a ``state_dict`` entry: the block's kind and tensors."""
        return {"kind": self.kind, **self.tensors()}

    @staticmethod
    def from_state(state: dict[str, object]) -> Block:
        """Return the block saved by :meth:`state`.

        Raises:
            ValueError: For an unknown kind.
        """
        entries = dict(state)
        kind = entries.pop("kind", None)
        if kind not in Block.registry:
            known = ", ".join(repr(k) for k in Block.registry)
            raise ValueError(f"Unknown block kind {kind!r} in the state; known: {known}.")
        return Block.registry[kind].from_state_entries(entries)

    @classmethod
    def from_state_entries(cls, entries: dict[str, object]) -> Block:
        """Return the block from a state's entries (its kind removed)."""
        return cls.from_tensors(entries)  # type: ignore[arg-type]


class BlockSum(ABC):
    """``Σ_p s_p B_p``: one parameter's blocks added over batches, and over ranks.

    A parameter's sum is made by its blocks (:meth:`Block.new_sum`). Over
    ``torch.distributed`` ranks, :func:`~kfoc_backpack.dataset.distributed.reduce_sums`
    sums every parameter's :meth:`summed` parts in one all-reduce, gathers their
    :meth:`gathered` parts in one all-gather, and asks each sum to :meth:`combine` them.

    Attributes:
        num_samples: Inputs of the batches added so far.
    """

    def __init__(self, zero: Block):
        self.zero = zero
        self.num_samples = 0

    def add(self, block: Block, num_samples: int, scale: float = 1.0) -> None:
        """Add ``scale · block`` of a batch of ``num_samples ≥ 1`` inputs.

        Raises:
            ValueError: For ``num_samples < 1`` or a block of another structure.
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}.")
        if not isinstance(block, type(self.zero)):
            raise ValueError(
                f"A parameter's blocks changed structure: {type(self.zero).__name__} "
                f"expected, got {type(block).__name__}."
            )
        self.num_samples += int(num_samples)
        self._add(block, num_samples, scale)

    @abstractmethod
    def _add(self, block: Block, num_samples: int, scale: float) -> None:
        """Add the batch's block (checked)."""

    @property
    @abstractmethod
    def empty(self) -> bool:
        """Whether nothing was added yet."""

    @abstractmethod
    def result(self) -> Block:
        """Return the sum in this process (the zero block while :attr:`empty`)."""

    @abstractmethod
    def summed(self) -> list[Tensor]:
        """Parts summed over the ranks (zeros while :attr:`empty`)."""

    def gathered(self) -> list[Tensor]:
        """Parts gathered from every rank (zeros while :attr:`empty`); default none."""
        return []

    @abstractmethod
    def combine(self, summed: list[Tensor], gathered: list[list[Tensor]], counts: Tensor) -> Block:
        """Return the sum over all ranks.

        Args:
            summed: :meth:`summed`'s parts, summed over the ranks.
            gathered: Per rank, its :meth:`gathered` parts.
            counts: ``[W]`` inputs each rank added.
        """
