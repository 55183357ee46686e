r"""Per-sample matrices kept as products over shared positions, never formed.

A layer whose weight is shared over ``T`` positions (a ``Linear`` layer applied to
``T`` tokens, a convolution at ``T`` output positions) has per-sample matrices

.. math::
    X_{j,k} = G_{j,k}ᵀ A_k = Σ_t g_{j,k,t} a_{k,t}ᵀ ,

with ``A_k`` (``[T, N]``) the inputs of sample ``k`` and ``G_{j,k}`` (``[T, M]``) the
output-side vectors of its ``j``-th column (Hessian-root column, sampled label).
Stored this way a term costs ``T·(M + N)`` numbers instead of ``M·N``, and the power
method's half-steps never form ``X``:

.. math::
    Σ_{j,k} X_{j,k}ᵀ L X_{j,k} = Σ_k A_kᵀ \Big(Σ_j G_{j,k} L G_{j,k}ᵀ\Big) A_k ,
    \qquad
    Σ_{j,k} X_{j,k} R X_{j,k}ᵀ = Σ_{j,k} G_{j,k}ᵀ (A_k R A_kᵀ) G_{j,k} .

Index conventions of this module: ``J`` columns per sample, ``K`` samples, ``T``
shared positions, ``M`` output features (left factor ``[M, M]``), ``N`` input features
(right factor ``[N, N]``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from kfoc_backpack.enums import DiagonalRoute, Route
from kfoc_backpack.solver._common import (
    KroneckerFactors,
    SolverOptions,
    left_start,
    working_dtype,
    working_tensors,
    zero_solution,
)
from kfoc_backpack.solver.coefficient import check_every
from kfoc_backpack.solver.error import kron_error_from
from kfoc_backpack.solver.power import factor_power_iteration
from kfoc_backpack.solver.rescale import (
    mean_squares_summary,
    needed_exponents,
    scaled_back,
    scaled_trace,
)
from kfoc_backpack.solver.scale import finalize
from kfoc_backpack.solver.shared.route import LayerSizes

DIAGONAL_CHUNK = 1 << 20
"""Numbers of per-sample matrices :meth:`FactoredTerms.diagonal` forms at once (at least
one sample's): 4 MiB in float32, so that the squares are summed while the products are
still in cache — about twice as fast as 64 MiB chunks on one CPU core (ViT-tiny's
``mlp.fc1``: ``J·M·N`` = 9·768·192 per sample)."""

DIAGONAL_ROUTES = tuple(DiagonalRoute)
"""How :meth:`FactoredTerms.diagonal` sums ``X ⊙ X``: ``formed`` and ``pairs``."""


def diagonal_flops(sizes: LayerSizes) -> dict[DiagonalRoute, int]:
    """Multiply-adds of the diagonal ``Σ_{j,k} X_{j,k} ⊙ X_{j,k}`` (``[M, N]``) per route.

    ``formed`` forms every ``X_{j,k}`` (``J·K·T·M·N``) and writes ``J·K·M·N`` numbers
    to square them; ``pairs`` expands each square over the position pairs ``t ≤ t'``,
    ``Σ_k Σ_{t≤t'} w_{tt'} (Σ_j g_{jkt} ⊙ g_{jkt'}) (a_{kt} ⊙ a_{kt'})ᵀ``, one product
    with inner size ``K·T(T+1)/2`` that writes ``M·N`` numbers once
    (``K·T(T+1)/2·(M·N + J·M + N)``).
    """
    cols, num, pos, m, n = sizes[:5]
    pairs = pos * (pos + 1) // 2
    return {
        DiagonalRoute.FORMED: cols * num * pos * m * n,
        DiagonalRoute.PAIRS: num * pairs * (m * n + cols * m + n),
    }


def norm_flops(sizes: LayerSizes) -> dict[str, int]:
    """Multiply-adds of ``‖F‖²_F`` per route of :meth:`FactoredTerms.norm_sq`.

    ``positions``: the output-side ``T × T`` Gram blocks of every pair of the ``J·K``
    matrices and the input-side ones of every sample pair,
    ``(J·K)²·T²·M + K²·T²·N``; ``formed``: forming the matrices and their Gram,
    ``J·K·T·M·N + (J·K)²·M·N``.
    """
    cols, num, pos, m, n = sizes[:5]
    pairs = (cols * num) ** 2
    return {
        "positions": pairs * pos * pos * m + num * num * pos * pos * n,
        "formed": cols * num * pos * m * n + pairs * m * n,
    }


def choose_diagonal_route(sizes: LayerSizes) -> DiagonalRoute:
    """Return the diagonal's route with fewer multiply-adds (``pairs`` where ``T + 1 ≲ 2·J``).

    Where the counts are close ``pairs`` is faster still: its one product is bound by
    arithmetic, ``formed`` by writing the ``J·K·M·N`` products (both routes timed on
    ResNet-18's stages: ``python integration/diagonal_routes.py``).
    """
    flops = diagonal_flops(sizes)
    if flops[DiagonalRoute.PAIRS] <= flops[DiagonalRoute.FORMED]:
        return DiagonalRoute.PAIRS
    return DiagonalRoute.FORMED


@dataclass(frozen=True)
class FactoredTerms:
    """``F = Σ_{j,k} vec(X_{j,k}) vec(X_{j,k})ᵀ`` with ``X_{j,k} = G_{j,k}ᵀ A_k``.

    Attributes:
        grads: ``[J, K, T, M]`` output-side vectors ``g_{j,k,t}``.
        inputs: ``[K, T, N]`` input-side vectors ``a_{k,t}``.
        route: The route these terms are solved by, ``factored`` (class attribute).
    """

    grads: Tensor
    inputs: Tensor
    route = Route.FACTORED

    def __post_init__(self) -> None:
        g, a = self.grads, self.inputs
        if g.dim() != 4 or a.dim() != 3 or g.shape[1:3] != a.shape[:2]:
            raise ValueError(
                "FactoredTerms needs grads [J, K, T, M] and inputs [K, T, N] with equal K "
                f"and T, got {tuple(g.shape)} and {tuple(a.shape)}."
            )

    @property
    def shape(self) -> tuple[int, int]:
        """``(M, N)``: sizes of the left and right factors."""
        return self.grads.shape[-1], self.inputs.shape[-1]

    @property
    def num_terms(self) -> int:
        """Number of per-sample matrices ``J·K``."""
        return self.grads.shape[0] * self.grads.shape[1]

    @property
    def like(self) -> Tensor:
        """A stored tensor, whose device and dtype the terms have."""
        return self.grads

    def nbytes(self) -> int:
        """Bytes held by the stored tensors."""
        return sum(t.numel() * t.element_size() for t in (self.grads, self.inputs))

    def detach(self) -> FactoredTerms:
        """Return the same terms (same class), detached from any autograd graph."""
        return dataclasses.replace(self, grads=self.grads.detach(), inputs=self.inputs.detach())

    def scale_summary(self, dtype: torch.dtype | None = None) -> Tensor:
        """``[Σ ‖G‖²‖A‖² ≥ tr F, mean g², mean a²]`` (see :mod:`~kfoc_backpack.solver.rescale`)."""
        out = torch.linalg.vector_norm(self.grads, dim=(2, 3), dtype=dtype).double()  # [J, K]
        inp = torch.linalg.vector_norm(self.inputs, dim=(1, 2), dtype=dtype).double()  # [K]
        bound = (out.square() @ inp.square()).sum()
        return mean_squares_summary(bound, out, inp, self.grads, self.inputs)

    def scaled(self, out_exponent: int, in_exponent: int) -> FactoredTerms:
        """Return the terms with ``G·2^out_exponent``, ``A·2^in_exponent`` (exact; same class)."""
        return dataclasses.replace(
            self, grads=self.grads * 2.0**out_exponent, inputs=self.inputs * 2.0**in_exponent
        )

    def rotated(self, left_basis: Tensor, right_basis: Tensor) -> FactoredTerms:
        """Return the terms (same class) of ``U_Lᵀ X_{j,k} U_R = (G_{j,k} U_L)ᵀ (A_k U_R)``.

        Args:
            left_basis: ``[M, P]`` ``U_L``.
            right_basis: ``[N, Q]`` ``U_R``.
        """
        return dataclasses.replace(
            self,
            grads=self.grads @ left_basis.to(self.grads),
            inputs=self.inputs @ right_basis.to(self.inputs),
        )

    def to_right(self, left: Tensor) -> Tensor:
        """``Σ_{j,k} X_{j,k}ᵀ L X_{j,k}`` (``[N, N]``) for an ``[M, M]`` ``L``.

        ``W_k = Σ_j G_{jk} L G_{jk}ᵀ`` (``[K, T, T]``), then ``Σ_k A_kᵀ (W_k A_k)`` as one
        product with inner size ``K·T``: the wide products are single GEMMs over all
        ``(j, k, t)`` rows, never ``K`` separate ``N × N`` results.
        """
        g, a = self.grads, self.inputs
        m, n = self.shape
        moved = (g.reshape(-1, m) @ left.to(g.dtype)).view(g.shape)  # G L, [J, K, T, M]
        middle = (moved @ g.mT).sum(0)  # [K, T, T]
        return a.reshape(-1, n).T @ (middle @ a).reshape(-1, n)

    def to_left(self, right: Tensor) -> Tensor:
        """``Σ_{j,k} X_{j,k} R X_{j,k}ᵀ`` (``[M, M]``) for an ``[N, N]`` ``R``.

        ``V_k = A_k R A_kᵀ`` (``[K, T, T]``), then ``Σ_{j,k} G_{jk}ᵀ (V_k G_{jk})`` as one
        product with inner size ``J·K·T`` (never ``J·K`` separate ``M × M`` results).
        """
        g, a = self.grads, self.inputs
        m, n = self.shape
        middle = (a.reshape(-1, n) @ right.to(a.dtype)).view(a.shape) @ a.mT  # [K, T, T]
        return g.reshape(-1, m).T @ (middle @ g).reshape(-1, m)

    def samples(self) -> Tensor:
        """Form the per-sample matrices ``[J·K, M, N]`` (for small layers and tests)."""
        return torch.einsum("jktm,ktn->jkmn", self.grads, self.inputs).flatten(end_dim=1)

    def solve(
        self,
        options: SolverOptions | None = None,
        init: Tensor | None = None,
        right_trace: Tensor | float | None = None,
    ) -> KroneckerFactors:
        """Optimal factors, see :func:`nearest_kronecker_factored`."""
        return nearest_kronecker_factored(self, options=options, init=init, right_trace=right_trace)

    def norm_sq(self) -> Tensor:
        """``‖F‖²_F = Σ_{a,b} ⟨X_a, X_b⟩²`` over the ``J·K`` per-sample matrices.

        By the cheaper of two exact routes (:func:`norm_flops`): the ``T × T`` Gram
        blocks, ``⟨X_{jk}, X_{j'k'}⟩ = Σ (G_{jk} G_{j'k'}ᵀ) ⊙ (A_k A_{k'}ᵀ)`` (each input
        block once per sample pair), or the Gram of the formed matrices, ``M_c`` of their
        rows at a time (at most :data:`DIAGONAL_CHUNK` numbers).
        """
        cols, num, pos, m = self.grads.shape
        n = self.inputs.shape[-1]
        flops = norm_flops(LayerSizes(cols, num, pos, m, n))
        if flops["formed"] < flops["positions"]:
            return self._norm_sq_formed()
        g, a = self.grads, self.inputs
        total = g.new_zeros(())
        for k in range(num):
            inputs = a[k] @ a.mT  # [K, T, T]: A_k A_k'ᵀ, once per sample pair
            for j in range(cols):  # one row of the [JK, JK] inner products at a time
                outputs = g[j, k] @ g.mT  # [J, K, T, T]: G_jk G_j'k'ᵀ
                total = total + (outputs * inputs).sum((-2, -1)).square().sum()
        return total

    def _norm_sq_formed(self) -> Tensor:
        cols, num, pos, m = self.grads.shape
        n = self.inputs.shape[-1]
        gram = self.grads.new_zeros(cols * num, cols * num)
        step = max(1, DIAGONAL_CHUNK // max(cols * num * n, 1))
        for start in range(0, m, step):  # rows of every X_{jk} at once
            rows = torch.einsum(
                "jktm,ktn->jkmn", self.grads[..., start : start + step], self.inputs
            )
            flat = rows.reshape(cols * num, -1)
            gram += flat @ flat.T
        return gram.square().sum()

    def error(self, left: Tensor, right: Tensor, relative: bool = True) -> Tensor:
        """Frobenius error of ``left ⊗ right`` against ``F``."""
        cross = (self.to_right(left) * right).sum()
        return kron_error_from(self.norm_sq(), cross, left, right, relative)

    def diagonal(self, route: DiagonalRoute | str | None = None) -> Tensor:
        """``diag(F) = Σ_{j,k} X_{j,k} ⊙ X_{j,k}`` as an ``[M, N]`` matrix (row-major ``vec``).

        Each entry squares a sum over the positions. The route with fewer multiply-adds
        (:func:`choose_diagonal_route`), or ``route`` where given, either forms the
        per-sample matrices (``formed``: ``J·K·T·M·N``, as the ``formed`` solver route
        pays once) or expands the squares over position pairs (``pairs``:
        ``K·T(T+1)/2·M·N`` in one product); a block of samples at a time, at most
        :data:`DIAGONAL_CHUNK` numbers.

        Args:
            route: Force ``"formed"`` or ``"pairs"`` (benchmarks); default: the cheaper.
        """
        cols, num, pos, m = self.grads.shape
        n = self.inputs.shape[-1]
        if route is None:
            route = choose_diagonal_route(LayerSizes(cols, num, pos, m, n))
        if DiagonalRoute.parse(route, "diagonal route") is DiagonalRoute.PAIRS:
            return self._diagonal_by_pairs()
        total = self.grads.new_zeros(m, n)
        step = max(1, DIAGONAL_CHUNK // max(cols * m * n, 1))
        for start in range(0, num, step):
            block = torch.einsum(
                "jktm,ktn->jkmn",
                self.grads[:, start : start + step],
                self.inputs[start : start + step],
            )
            total += block.square_().sum((0, 1))
        return total

    def _diagonal_by_pairs(self) -> Tensor:
        """Sum the diagonal over position pairs (the ``pairs`` route).

        ``Σ_k Σ_{t≤t'} w_{tt'} (Σ_j g_{jkt} ⊙ g_{jkt'}) (a_{kt} ⊙ a_{kt'})ᵀ`` with
        ``w = 2`` off the diagonal, since entrywise
        ``(Σ_t g_t a_tᵀ)² = Σ_{t,t'} (g_t ⊙ g_{t'}) (a_t ⊙ a_{t'})ᵀ``.
        """
        cols, num, pos, m = self.grads.shape
        n = self.inputs.shape[-1]
        first, second = torch.triu_indices(pos, pos, device=self.grads.device)
        weight = torch.where(first == second, 1.0, 2.0).to(self.grads.dtype)
        total = self.grads.new_zeros(m, n)
        step = max(1, DIAGONAL_CHUNK // max(len(first) * (cols * m + n), 1))
        for start in range(0, num, step):
            g = self.grads[:, start : start + step]
            a = self.inputs[start : start + step]
            left = (g[:, :, first] * g[:, :, second]).sum(0) * weight[:, None]  # [k, P, M]
            right = a[:, first] * a[:, second]  # [k, P, N]
            total += left.reshape(-1, m).T @ right.reshape(-1, n)
        return total

    def dense(self) -> Tensor:
        """``F`` as a dense ``[M·N, M·N]`` matrix (for small layers and tests)."""
        flat = self.samples().flatten(start_dim=1)
        return flat.T @ flat


def nearest_kronecker_factored(
    terms: FactoredTerms,
    *,
    options: SolverOptions | None = None,
    init: Tensor | None = None,
    right_trace: Tensor | float | None = None,
) -> KroneckerFactors:
    """Optimal ``L ⊗ R`` for :class:`FactoredTerms`, by the power method in factor space.

    The iterates are those of :func:`~kfoc_backpack.solver.nearest_kronecker_samples`
    on the formed ``X_{j,k}`` (same start ``L⁽⁰⁾ = I``, same stopping test), computed
    through the factors. Cost per step
    ``O(J·K·T·M·(M + T) + K·T·N·(N + T))``, memory ``O(K·T²)`` beyond the terms.

    Args:
        terms: The factored per-sample matrices.
        options: Solver options.
        init: Optional ``[M, M]`` warm start of the left factor.
        right_trace: Split the scale so that ``tr(right)`` equals this (default:
            even split).

    Returns:
        The optimal factors (conventions of the solver package).
    """
    working_dtype(terms.grads.dtype)  # floating input, or the TypeError that says so
    exponents = needed_exponents(terms.scale_summary, terms.grads, terms.inputs)
    if exponents is not None:  # far from unit scale: solve scaled sides, exactly
        factors = nearest_kronecker_factored(
            terms.scaled(*exponents),
            options=options,
            init=init,
            right_trace=scaled_trace(right_trace, exponents[1]),
        )
        return scaled_back(factors, *exponents, right_trace)
    opts, out_dtype, tensors = working_tensors(options, terms.grads, terms.inputs)
    terms = FactoredTerms(*tensors)
    m, n = terms.shape
    like = terms.grads
    if terms.num_terms == 0:
        return zero_solution(m, n, like, out_dtype)
    start = left_start(
        m, like, opts, init, lambda: torch.eye(m, dtype=like.dtype, device=like.device)
    )
    left, right, iters, converged = factor_power_iteration(
        terms.to_right,
        terms.to_left,
        start,
        opts.tol,
        opts.max_iter,
        check_every(like.device),
        opts.stop,
    )
    left, right = finalize(
        left, right, out_dtype, right_trace=right_trace, what="nearest_kronecker_factored"
    )
    return KroneckerFactors(left, right, iters, converged)
