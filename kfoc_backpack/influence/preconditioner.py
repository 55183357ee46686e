r"""The inverse damped curvature ``(B + λI)⁻¹`` an influence score applies, block by block.

A :class:`Preconditioner` is a list of :class:`Group` s: each holds some trainable
parameters (their gradients concatenated in the group's order), the eigenform of their
curvature block (:class:`~kfoc_backpack.blocks.Decomposed`: a Kronecker, eigenvalue-
corrected, dense or identity block) and its damping ``λ``. Any curvature of the package
makes one — a fitted Laplace approximation (``kfoc``, ``ekfoc``, ``ekfac``, ``kfac``, or
laplace-torch's own ``kron``), BackPACK's per-parameter factors, the identity, or the
exact dense curvature of a small model (one group over all parameters, the cross-layer
terms kept) — and every one answers the same two questions:

* :meth:`Group.precondition`: ``[R, P]`` rows times ``(B + λ)⁻¹`` (the block rotates
  them into its eigenbasis, divides by ``S + λ`` and rotates back);
* :meth:`Group.square_form`: ``gᵀ (B + λ)⁻¹ g`` per row (self-influence).

Curvature is taken per input (the Hessian of the *mean* training loss, as influence
functions and kronfluence define it): a Laplace approximation's summed curvature is
divided by its number of inputs. Damping is :class:`~kfoc_backpack.enums.Damping`:
kronfluence's heuristic ``λ = 0.1 ×`` the block's mean eigenvalue by default, or one
number for every block. Eigendecompositions run in float64 and the eigenforms are kept
in the curvature's dtype.

Index conventions: ``P`` a group's entries, ``R`` rows multiplied.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import Module, Parameter

from kfoc_backpack.blocks import Block, DenseBlock
from kfoc_backpack.blocks.base import Decomposed, Jacobian
from kfoc_backpack.enums import Damping

DENSE_LIMIT = 1 << 14
"""Most parameters the exact dense curvature takes (a ``[P, P]`` float64 matrix: 2 GiB)."""


@dataclass(frozen=True)
class Identity(Decomposed):
    """``I_P`` in eigenform (no curvature: plain gradient products).

    Attributes:
        entries: ``P``.
        like: A tensor of the dtype and device of the products.
    """

    entries: int
    like: Tensor

    @property
    def size(self) -> int:  # type: ignore[override]
        """``P``."""
        return self.entries

    @property
    def eigenvectors(self) -> list[Tensor]:
        """None stored: the basis is the identity."""
        return []

    @property
    def eigenvalues(self) -> list[Tensor]:
        """``[1, …, 1]``."""
        return [self.like.new_ones(self.entries)]

    def spectrum(self, delta: Tensor, exponent: float = 1, damping: bool = False) -> Tensor:
        """``(1 + δ)^exponent`` per entry."""
        return torch.pow(self.like.new_ones(self.entries) + delta, exponent)

    def rotate(self, rows: Tensor) -> Tensor:
        """Return the rows themselves."""
        return rows

    def unrotate(self, rotated: Tensor) -> Tensor:
        """Return the rows themselves."""
        return rotated

    def basis(self) -> Tensor:
        """``I_P``."""
        return torch.eye(self.entries, dtype=self.like.dtype, device=self.like.device)

    def scaled(self, factor: Tensor | float) -> Decomposed:
        """Refused: the identity has no scale to change.

        Raises:
            TypeError: Always.
        """
        raise TypeError("The identity preconditioner cannot be scaled.")

    def diag(self, delta: Tensor, exponent: float = 1, damping: bool = False) -> Tensor:
        """``(1 + δ)^exponent`` per entry."""
        return self.spectrum(delta, exponent)


@dataclass(frozen=True)
class Group:
    """Parameters that share one curvature block, its eigenform and its damping.

    Attributes:
        names: The parameters, in the order their gradients are concatenated.
        sizes: Each parameter's number of entries.
        decomposed: The block's eigenform, over ``Σ sizes`` entries.
        delta: ``λ``, a 0-d tensor.
    """

    names: tuple[str, ...]
    sizes: tuple[int, ...]
    decomposed: Decomposed
    delta: Tensor

    def precondition(self, rows: Tensor) -> Tensor:
        """``[R, P]`` rows times ``(B + λ)⁻¹``."""
        return self.decomposed.bmm(rows.to(self.delta.dtype), self.delta, -1)

    def square_form(self, rows: Tensor) -> Tensor:
        """``[R]``: ``gᵀ (B + λ)⁻¹ g`` of each row ``g`` (``[R, P]``)."""
        rotated = self.decomposed.rotate(rows.to(self.delta.dtype))
        weighted = rotated.square() * self.decomposed.spectrum(self.delta, -1)
        return weighted.reshape(len(rows), -1).sum(1)

    def split(self, rows: Tensor) -> dict[str, Tensor]:
        """``[R, P]`` rows cut into each parameter's ``[R, P_i]``."""
        return dict(zip(self.names, rows.split(list(self.sizes), dim=1)))

    def rows(self, gradients: Mapping[str, Jacobian | Tensor], num: int) -> Tensor:
        """``[R, P]``: the group's per-sample rows concatenated, in ``delta``'s dtype.

        Args:
            gradients: Per parameter, a Jacobian (its ``rows()``) or the rows themselves.
            num: ``R``, the rows of each parameter (zero rows where one is absent).
        """
        return concatenate(self.names, self.sizes, gradients, num, self.delta)


def concatenate(
    names: Sequence[str],
    sizes: Sequence[int],
    gradients: Mapping[str, Jacobian | Tensor],
    num: int,
    like: Tensor,
) -> Tensor:
    """``[R, Σ sizes]``: each parameter's ``R`` rows side by side (zero where absent).

    Args:
        names: The parameters, in order.
        sizes: Their numbers of entries.
        gradients: Per parameter, a Jacobian (its ``rows()``, ``[K, N, P_i]`` with
            ``K·N = R``) or the ``[R, P_i]`` rows themselves.
        num: ``R``.
        like: A tensor of the result's dtype and device.
    """
    parts = []
    for name, size in zip(names, sizes):
        value = gradients.get(name)
        if value is None:
            parts.append(like.new_zeros(num, size))
            continue
        rows = value if isinstance(value, Tensor) else value.rows()
        parts.append(rows.reshape(num, size).to(like.dtype))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _cast(decomposed: Decomposed, dtype: torch.dtype) -> Decomposed:
    """Return the eigenform with its tensors (and kept factors) in ``dtype``."""
    changes = {}
    for field in dataclasses.fields(decomposed):  # type: ignore[arg-type]
        value = getattr(decomposed, field.name)
        if isinstance(value, Tensor):
            changes[field.name] = value.to(dtype)
        elif isinstance(value, Block):
            changes[field.name] = value.to(dtype=dtype)
    return dataclasses.replace(decomposed, **changes)  # type: ignore[type-var]


def typed(
    factors: Mapping[str, Block | Sequence[Tensor]], templates: Mapping[str, Block]
) -> dict[str, Block]:
    """Return typed blocks from blocks or from BackPACK's/laplace-torch's lists of factors.

    Args:
        factors: Per parameter, its block, or its factors as BackPACK's ``savefield`` and
            laplace-torch's ``Kron.kfacs`` hold them (``[L, R]`` or ``[B]``).
        templates: Per parameter, a block of its structure (the collection's zero
            blocks), which reads the list.

    Raises:
        ValueError: For a parameter without a template, or a list of other shapes.
    """
    blocks = {}
    for name, value in factors.items():
        if isinstance(value, Block):
            blocks[name] = value
        elif name not in templates:
            raise ValueError(f"influence: '{name}' is not a trainable parameter of the model.")
        else:
            blocks[name] = templates[name].from_kfacs(value, f"influence: '{name}'")
    return blocks


def damping_of(decomposed: Decomposed, damping: float, rule: Damping | str, what: str) -> Tensor:
    """``λ`` of one block (:class:`~kfoc_backpack.enums.Damping`).

    Raises:
        ValueError: For a negative ``damping``, or a block whose damped spectrum is not
            positive (``λ = 0`` on a singular block), naming ``what``.
    """
    rule = Damping.parse(rule, "damping_rule")
    if not damping >= 0:
        raise ValueError(f"damping must be a non-negative number, got {damping!r}.")
    spectrum = decomposed.spectrum(torch.zeros((), dtype=decomposed.eigenvalues[0].dtype))
    if rule is Damping.MEAN_EIGENVALUE:
        delta = damping * spectrum.mean()
    else:
        delta = torch.tensor(float(damping), dtype=spectrum.dtype)
    smallest = float((spectrum + delta).min())
    if not smallest > 0 or not torch.isfinite(spectrum).all():
        raise ValueError(
            f"influence: the damped curvature of {what} is not positive definite (its "
            f"smallest eigenvalue plus λ is {smallest:.3g}); damp it with a positive "
            "damping (rule='absolute' where the block is all zero: a parameter the data "
            "does not reach)."
        )
    return delta


@dataclass(frozen=True)
class Preconditioner:
    """``(B + λ)⁻¹`` over groups of parameters (see the module docstring).

    Attributes:
        groups: The blocks, each over its parameters.
    """

    groups: tuple[Group, ...]

    @property
    def names(self) -> list[str]:
        """Every parameter the preconditioner covers, group by group."""
        return [name for group in self.groups for name in group.names]

    @classmethod
    def from_blocks(
        cls,
        blocks: Mapping[str, Block],
        damping: float = 0.1,
        rule: Damping | str = Damping.MEAN_EIGENVALUE,
        scale: float = 1.0,
    ) -> Preconditioner:
        """One group per parameter, from its block.

        Args:
            blocks: Per parameter name (``model.named_parameters()``' names), its block
                (:mod:`kfoc_backpack.blocks`; lists of factors: :func:`typed`).
            damping: The damping (a factor of the mean eigenvalue, or ``λ`` itself).
            rule: :class:`~kfoc_backpack.enums.Damping`.
            scale: Multiplies every block first (e.g. ``1/N`` for a summed curvature).

        Raises:
            ValueError: For a damping that leaves a block singular.
        """
        groups = []
        for name, block in blocks.items():
            if scale != 1.0:
                block = block.scaled(scale)
            dtype = next(iter(block.tensors().values())).dtype
            decomposed = _cast(block.to(dtype=torch.float64).decompose(f"'{name}'"), dtype)
            delta = damping_of(decomposed, damping, rule, f"'{name}'").to(dtype)
            groups.append(Group((name,), (block.size,), decomposed, delta))
        return cls(tuple(groups))

    @classmethod
    def from_laplace(
        cls,
        la: object,
        damping: float = 0.1,
        rule: Damping | str = Damping.MEAN_EIGENVALUE,
    ) -> Preconditioner:
        """From a fitted all-weights Laplace approximation: its curvature per input.

        This package's classes (``hessian_structure="kfoc"``, ``"ekfoc"``, ``"ekfac"``,
        ``"kfac"``) give their typed blocks; laplace-torch's own ``KronLaplace``
        (``"kron"``) its ``Kron`` factors. The curvature is ``la.H`` (laplace-torch's
        likelihood factor included) divided by ``la.n_data``; the prior is not added
        (an influence score's damping plays its part).

        Raises:
            ValueError: For an unfitted approximation or one without Kronecker
                factors; NotImplementedError for last-layer approximations.
        """
        facs = getattr(la, "H_facs", None)
        kfacs = getattr(facs, "kfacs", None)
        if facs is None or kfacs is None:
            raise ValueError(
                f"influence: {type(la).__name__} holds no Kronecker-factored curvature; "
                "fit an all-weights Laplace approximation with hessian_structure 'kfoc', "
                "'ekfoc', 'ekfac', 'kfac' or 'kron' first."
            )
        from laplace import LLLaplace

        if isinstance(la, LLLaplace):
            raise NotImplementedError(
                "influence: last-layer Laplace approximations are not supported; fit "
                "subset_of_weights='all'."
            )
        names = list(params_of(la.model))  # type: ignore[attr-defined]
        values = getattr(facs, "blocks", None)
        if values is None:  # laplace-torch's own Kron: lists of factors
            from kfoc_backpack.collect.hooks import TermCollector

            loss = la.backend.lossfunc  # type: ignore[attr-defined]
            templates = TermCollector(la.model, loss, owner="influence").zero_blocks()  # type: ignore[attr-defined]
            values = list(typed(dict(zip(names, kfacs)), templates).values())
        if len(values) != len(names):
            raise ValueError(
                f"influence: {type(la).__name__} has {len(values)} curvature blocks for "
                f"{len(names)} trainable parameters."
            )
        n_data = float(la.n_data)  # type: ignore[attr-defined]
        return cls.from_blocks(dict(zip(names, values)), damping, rule, scale=1.0 / n_data)

    @classmethod
    def identity(cls, model: Module, damping: float = 0.0) -> Preconditioner:
        """``(I + λ)⁻¹`` per parameter: plain gradient products (divided by ``1 + λ``)."""
        groups = []
        for name, param in params_of(model).items():
            like = param.detach()
            delta = torch.tensor(float(damping), dtype=like.dtype, device=like.device)
            block = Identity(param.numel(), like)
            groups.append(Group((name,), (param.numel(),), block, delta))
        return cls(tuple(groups))

    @classmethod
    def dense(
        cls,
        names: Sequence[str],
        sizes: Sequence[int],
        matrix: Tensor,
        damping: float = 0.1,
        rule: Damping | str = Damping.MEAN_EIGENVALUE,
    ) -> Preconditioner:
        """One group over all ``names``: a dense ``[P, P]`` curvature, cross terms kept.

        Raises:
            ValueError: For more than :data:`DENSE_LIMIT` entries or a matrix of another size.
        """
        total = sum(sizes)
        if total > DENSE_LIMIT or matrix.shape != (total, total):
            raise ValueError(
                f"influence: a dense curvature over {total} parameters (limit "
                f"{DENSE_LIMIT}) needs a [{total}, {total}] matrix, got {tuple(matrix.shape)}."
            )
        exact = DenseBlock(matrix.double()).decompose("the dense curvature")
        decomposed = _cast(exact, matrix.dtype)
        delta = damping_of(decomposed, damping, rule, "the dense curvature").to(matrix.dtype)
        return cls((Group(tuple(names), tuple(sizes), decomposed, delta),))

    def scores(self, test: Mapping[str, Tensor], train: Mapping[str, Tensor]) -> Tensor:
        """``[N_test, N_train]``: ``g_testᵀ (B + λ)⁻¹ g_train`` from stored gradients.

        Args:
            test: Per parameter, ``[N_test, P_i]`` per-sample gradients (absent: zero).
            train: Per parameter, ``[N_train, P_i]``.
        """
        num_test = next(iter(test.values())).shape[0]
        num_train = next(iter(train.values())).shape[0]
        total = None
        for group in self.groups:
            query = group.precondition(group.rows(test, num_test))
            share = query @ group.rows(train, num_train).T
            total = share if total is None else total + share
        return total  # type: ignore[return-value]

    def check_covers(self, names: Iterable[str]) -> None:
        """Refuse gradients of parameters that no group covers, naming them.

        Raises:
            ValueError: Listing the uncovered parameters.
        """
        missing = sorted(set(names) - set(self.names))
        if missing:
            raise ValueError(
                f"influence: no curvature block for the trainable parameters {missing}; "
                "the preconditioner must cover every trainable parameter (freeze the "
                "others)."
            )


def params_of(model: Module) -> dict[str, Parameter]:
    """Return the model's trainable parameters by name, in ``named_parameters`` order."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}
