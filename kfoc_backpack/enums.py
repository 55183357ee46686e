"""The package's options, one ``str, Enum`` each (as laplace-torch's ``utils/enums.py``).

Every argument that picks one of a few behaviours takes a member of one of these enums
or its string value (``Aggregation.RUNNING`` and ``"running"`` are the same), and an
unknown value raises a ``ValueError`` that names the argument and lists the members.
The members compare equal to, hash as, print as and serialise to their values, so
results, reports and state dicts hold the plain strings.

This module imports nothing of the package: every layer uses it.
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

C = TypeVar("C", bound="Choice")


__all__ = [
    "Aggregation",
    "Choice",
    "Curvature",
    "Damping",
    "DiagonalRoute",
    "Grouped",
    "Measurement",
    "Reduction",
    "Route",
    "Stop",
    "Structure",
]


class Choice(str, Enum):
    """Base of the package's options: a string value per member."""

    def __str__(self) -> str:
        """Return the value (``"running"``, not ``"Aggregation.RUNNING"``)."""
        return self.value

    @classmethod
    def parse(
        cls: type[C],
        value: object,
        argument: str | None = None,
        hint: str = "",
        members: tuple[C, ...] | None = None,
    ) -> C:
        """Return the member for ``value`` (a member or its string value).

        Args:
            value: A member of this enum or its value.
            argument: The argument's name, for the message (default: the enum's name).
            hint: A sentence appended to the message.
            members: The members the caller supports (default: all).

        Raises:
            ValueError: For any other value, naming the argument and the supported
                members.
        """
        allowed = tuple(cls) if members is None else members
        try:
            member = cls(value)
        except ValueError:
            member = None
        if member in allowed:
            return member
        name = argument or cls.__name__
        shown = value.value if isinstance(value, Enum) else value
        supported = ", ".join(repr(m.value) for m in allowed)
        raise ValueError(f"Unknown {name} {shown!r}; supported: {supported}.{hint}")

    @classmethod
    def values(cls) -> tuple[str, ...]:
        """Return the members' values, in definition order."""
        return tuple(member.value for member in cls)


class Curvature(Choice):
    """The curvature target whose blocks are approximated (docs/conventions.md §2).

    One name for what BackPACK spells as two classes (``KFOC``/``KFOCExact``) and
    laplace-torch as a backend and its ``stochastic`` flag.
    """

    GGN = "ggn"
    """The exact generalised Gauss-Newton matrix (columns of the loss Hessian's root)."""

    MC = "mc"
    """The Monte-Carlo Fisher: labels drawn from the model's predictive."""

    EF = "ef"
    """The empirical Fisher: the gradient at the true label."""

    @property
    def stochastic(self) -> bool:
        """Whether the target draws random labels (its passes need seeds)."""
        return self is Curvature.MC


class Aggregation(Choice):
    """How per-batch curvature is combined over a data set (docs/conventions.md §4)."""

    APPROX = "approx"
    """The paper's K-FOC_approx: per-batch factors summed factor-wise, as K-FAC."""

    RUNNING = "running"
    """The paper's K-FOC_running: the optimal product of the estimate plus each batch."""

    OPTIMAL = "optimal"
    """The Frobenius-optimal factors of the whole data set (power method over the data)."""

    @property
    def per_batch(self) -> bool:
        """Whether it combines per-batch factors (``approx``, ``running``), not terms."""
        return self is not Aggregation.OPTIMAL

    @classmethod
    def of_factors(cls) -> tuple[Aggregation, ...]:
        """Return the aggregations of per-batch factors (the optimum needs the terms)."""
        return cls.APPROX, cls.RUNNING


class Reduction(Choice):
    """How a loss was reduced over each batch, hence the data-set target's scale."""

    MEAN = "mean"
    """Batch means: the data-set target is ``Σ_p n_p F_p / N``."""

    SUM = "sum"
    """Batch sums: the data-set target is ``Σ_p F_p``."""

    def batch_scale(self, num_samples: int) -> float:
        """Weight ``s_p`` of a batch of ``num_samples`` inputs in the data-set sum."""
        return float(num_samples) if self is Reduction.MEAN else 1.0


class Route(Choice):
    """How a weight's per-sample terms are solved (docs/conventions.md §1)."""

    RANK_ONE = "rank-one"
    """One position: rank-one per-sample matrices, solved in coefficient space."""

    FORMED = "formed"
    """The per-sample matrices ``X`` formed."""

    FACTORED = "factored"
    """Through the output-side vectors and inputs, ``X`` never formed."""

    GRAM = "gram"
    """Through the Gram of the inputs at the positions."""

    OUTPUT_GRAM = "output-gram"
    """Through the Gram of the output-side vectors at the positions."""

    OPERATOR = "operator"
    """Through the products ``X_a X_bᵀ`` of the formed matrices."""


class Grouped(Choice):
    """The block of a grouped convolution's weight (``groups > 1``, docs/conventions.md §11)."""

    COUPLED = "coupled"
    """One product over all rows: a dense ``C_out × C_out`` output-side factor and one
    input-side factor shared by the groups (:class:`~kfoc_backpack.blocks.KroneckerBlock`,
    laplace-torch's ``kron`` layout). The closer structure on the measured library
    layers at 224 × 224 (docs/conventions.md §11)."""

    PER_GROUP = "per-group"
    """One Kronecker product per group, the blocks between groups dropped
    (:class:`~kfoc_backpack.blocks.GroupedKroneckerBlock`): ``G`` solves of one group's
    size, 2–100× cheaper; a depthwise layer's channels get their exact blocks."""


class Stop(Choice):
    """When the iterative solves of a weight's optimal factors stop."""

    FACTORS = "factors"
    """Once the unit-norm left factor changes by less than ``tol`` in a step (the
    paper's rule): the factors themselves to ``tol``, e.g. for preconditioners
    compared across batches."""

    OBJECTIVE = "objective"
    """Also once the captured squared norm ``σ² = ⟨F, L ⊗ R⟩² / ‖L ⊗ R‖²`` (the error
    is ``‖F‖² − σ²``) changes by less than ``tol`` relative in a step, whichever comes
    first: the approximation's error converges about twice as fast, in digits, as the
    factors."""


class DiagonalRoute(Choice):
    """How the diagonal of a shared-weight block in a basis is summed (eigenvalue correction)."""

    FORMED = "formed"
    """Form the rotated per-sample matrices and square them."""

    PAIRS = "pairs"
    """Expand each square over pairs of positions, one product."""


class Structure(Choice):
    """The ``hessian_structure`` names this package registers with laplace-torch."""

    KFOC = "kfoc"
    """K-FOC's Frobenius-optimal Kronecker factors."""

    KFAC = "kfac"
    """K-FAC's factors of the same per-sample quantities."""

    EKFOC = "ekfoc"
    """The eigenbasis of K-FOC's factors with the data set's own eigenvalues."""

    EKFAC = "ekfac"
    """The eigenbasis of K-FAC's factors with the data set's own eigenvalues (EK-FAC)."""


class Measurement(Choice):
    """What an influence score measures on a test input (:mod:`kfoc_backpack.influence`)."""

    LOSS = "loss"
    """The loss of one input, ``ℓ(f(x), y)`` as the training loss (summed, not averaged)."""

    MARGIN = "margin"
    """The classification margin ``f_y(x) − log Σ_{c≠y} exp f_c(x)`` (cross-entropy
    models; the measurement of the TRAK and kronfluence studies)."""


class Damping(Choice):
    """How the damping ``λ`` added to each curvature block is chosen (influence functions)."""

    MEAN_EIGENVALUE = "mean_eigenvalue"
    """``λ = damping × the block's mean eigenvalue``, per block (kronfluence's heuristic
    with ``damping = 0.1``): scores that do not change with the curvature's scale."""

    ABSOLUTE = "absolute"
    """``λ = damping`` for every block."""
