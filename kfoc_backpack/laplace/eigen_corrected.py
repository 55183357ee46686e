r"""Eigenvalue-corrected blocks in laplace-torch's decomposed-Kronecker interface.

An eigenvalue-corrected weight block (:mod:`kfoc_backpack.solver.correction`) keeps
the eigenbasis ``Q_L ⊗ Q_R`` of Kronecker factors but has its own eigenvalues, an
``[M, N]`` matrix ``S`` that is not an outer product ``λ_L λ_Rᵀ``:

.. math::
    H_{\text{block}} + δ I = (Q_L ⊗ Q_R)\, \mathrm{diag}(\mathrm{vec}(S + δ))\,
    (Q_L ⊗ Q_R)ᵀ .

:class:`EigenCorrectedDecomposed` answers what laplace-torch's ``KronDecomposed``
answers — ``logdet``, ``bmm``/``inv_square_form`` for any exponent, ``diag``,
``to_matrix``, adding per-layer or scalar prior precisions ``δ``, multiplying by a
scalar — so code written against a ``KronLaplace`` posterior keeps working. Bias (and
other one-factor) blocks are ``Q diag(λ + δ) Qᵀ``, as in laplace-torch.

Index conventions: ``M`` rows, ``N`` columns of a weight matrix (row-major ``vec``),
``B·K`` rows of the matrices multiplied, ``P`` parameters.
"""

from __future__ import annotations

import torch
from laplace.utils import KronDecomposed, symeig
from torch import Tensor

from kfoc_backpack.solver.correction import EigenCorrected

Block = EigenCorrected | Tensor
"""A weight's :class:`~kfoc_backpack.solver.correction.EigenCorrected` block or a bias's
dense ``[B, B]`` block."""


def _is_scalar(value: object) -> bool:
    if isinstance(value, Tensor):
        return value.ndim == 0 or (value.ndim == 1 and len(value) == 1)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class EigenCorrectedDecomposed(KronDecomposed):
    """Block-diagonal curvature with eigenvalue-corrected Kronecker blocks.

    Args:
        eigenvectors: Per block ``[Q_L, Q_R]`` (``[M, M]``, ``[N, N]``; a weight) or
            ``[Q]`` (a bias).
        eigenvalues: Per block ``[S]``: ``[M, N]`` for a weight, ``[B]`` for a bias.
        deltas: Per-block (or one) addend, e.g. the prior precision; default zero.
        damping: Must be ``False``: laplace-torch's damping adds ``√δ`` to each
            Kronecker factor's eigenvalues, which corrected blocks do not have.

    Raises:
        ValueError: For ``damping=True`` or eigenvalues that do not fit the vectors.
    """

    def __init__(
        self,
        eigenvectors: list[list[Tensor]],
        eigenvalues: list[list[Tensor]],
        deltas: Tensor | None = None,
        damping: bool = False,
    ):
        if damping:
            raise ValueError(
                "EigenCorrectedDecomposed: damping=True adds √δ to each Kronecker factor's "
                "eigenvalues; eigenvalue-corrected blocks have no factor eigenvalues. Use "
                "damping=False (the prior precision is added to every eigenvalue)."
            )
        for index, (vectors, values) in enumerate(zip(eigenvectors, eigenvalues)):
            expected = tuple(len(q) for q in vectors)
            if len(values) != 1 or tuple(values[0].shape) != expected:
                raise ValueError(
                    f"EigenCorrectedDecomposed: block {index} has eigenvectors of sizes "
                    f"{expected} and eigenvalues {[tuple(v.shape) for v in values]}; a "
                    "block needs one eigenvalue tensor of the eigenvectors' sizes."
                )
        super().__init__(eigenvectors, eigenvalues, deltas, damping=False)

    @classmethod
    def from_blocks(cls, blocks: list[Block]) -> EigenCorrectedDecomposed:
        """Decompose per-parameter blocks: corrected weights as they are, dense biases.

        Args:
            blocks: Per parameter an :class:`EigenCorrected` block or a symmetric
                ``[B, B]`` tensor.
        """
        vectors, values = [], []
        for block in blocks:
            if isinstance(block, EigenCorrected):
                vectors.append([block.left_basis, block.right_basis])
                values.append([block.diagonal])
            else:
                eigval, eigvec = symeig(block)  # as laplace-torch's Kron.decompose
                vectors.append([eigvec])
                values.append([eigval])
        return cls(vectors, values)

    def _spectrum(self, index: int, exponent: float) -> Tensor:
        """``(S + δ)^exponent`` of block ``index`` (``[M, N]`` or ``[B]``)."""
        return torch.pow(self.eigenvalues[index][0] + self.deltas[index], exponent)

    def _check_deltas(self, deltas: Tensor) -> None:
        """Accept a scalar or one value per block (a prior precision), naming the others."""
        if isinstance(deltas, Tensor) and (
            deltas.ndim == 0 or (deltas.ndim == 1 and len(deltas) in (1, len(self)))
        ):
            return
        shape = tuple(deltas.shape) if isinstance(deltas, Tensor) else type(deltas).__name__
        raise ValueError(
            f"EigenCorrectedDecomposed: cannot add {shape} to {len(self)} blocks; a "
            "Kronecker-factored posterior takes a scalar prior precision or one per "
            "parameter block (prior_structure='scalar' or 'layerwise'), not one per "
            "parameter ('diag')."
        )

    def __add__(self, deltas: Tensor) -> EigenCorrectedDecomposed:
        """Add a scalar, or one scalar per block, to every eigenvalue."""
        self._check_deltas(deltas)
        return EigenCorrectedDecomposed(self.eigenvectors, self.eigenvalues, self.deltas + deltas)

    def __mul__(self, scalar: Tensor | float) -> EigenCorrectedDecomposed:
        """Multiply every block (not the deltas) by a scalar."""
        if not _is_scalar(scalar):
            raise ValueError("EigenCorrectedDecomposed can only be multiplied by a scalar.")
        eigenvalues = [[values[0] * scalar] for values in self.eigenvalues]
        return EigenCorrectedDecomposed(self.eigenvectors, eigenvalues, self.deltas)

    __radd__ = __add__
    __rmul__ = __mul__

    def logdet(self) -> Tensor:
        """``log det(H + δ) = Σ_blocks Σ log(S + δ)``."""
        return sum(self._spectrum(i, 1).log().sum() for i in range(len(self)))

    def _bmm(self, W: Tensor, exponent: float = -1) -> Tensor:
        """``(H + δ)^exponent W`` for ``W`` of shape ``[B, K, P]``, block by block."""
        batch, classes, params = W.shape
        sizes = sum(values[0].numel() for values in self.eigenvalues)
        if sizes != params:
            raise ValueError(f"W has {params} parameters, the blocks {sizes}.")
        flat = W.reshape(batch * classes, params)
        start, parts = 0, []
        for index, vectors in enumerate(self.eigenvectors):
            spectrum = self._spectrum(index, exponent)
            size = spectrum.numel()
            part = flat[:, start : start + size]
            if len(vectors) == 1:
                (q,) = vectors
                parts.append(((part @ q) * spectrum) @ q.T)
            else:
                q_left, q_right = vectors
                rows = part.reshape(-1, *spectrum.shape)
                rotated = q_left.T @ rows @ q_right * spectrum
                parts.append((q_left @ rotated @ q_right.T).reshape(-1, size))
            start += size
        return torch.cat(parts, dim=1).reshape(batch, classes, params)

    def diag(self, exponent: float = 1) -> Tensor:
        """Diagonal of ``(H + δ)^exponent``: ``(Q_L ⊙ Q_L) E (Q_R ⊙ Q_R)ᵀ`` per weight."""
        diags = []
        for index, vectors in enumerate(self.eigenvectors):
            spectrum = self._spectrum(index, exponent)
            if len(vectors) == 1:
                diags.append(vectors[0].square() @ spectrum)
            else:
                q_left, q_right = vectors
                diags.append((q_left.square() @ spectrum @ q_right.square().T).flatten())
        return torch.cat(diags)

    def to_matrix(self, exponent: float = 1) -> Tensor:
        """Dense ``(H + δ)^exponent`` (block-diagonal; for small models and tests)."""
        blocks = []
        for index, vectors in enumerate(self.eigenvectors):
            spectrum = self._spectrum(index, exponent).flatten()
            basis = vectors[0] if len(vectors) == 1 else torch.kron(*vectors)
            blocks.append((basis * spectrum) @ basis.T)
        return torch.block_diag(*blocks)
