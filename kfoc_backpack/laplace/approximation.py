r"""The approximations a Kronecker-factored Laplace fit can make, as siblings.

Each :class:`Approximation` turns a pass (or passes) over the training data into the
raw curvature of the trainable parameters and then into laplace-torch's decomposed
posterior structure; :class:`~kfoc_backpack.laplace.fit.KFOCKronFit` calls whichever
its class names and knows nothing of their insides:

* :class:`KFOCFactors` — K-FOC's Frobenius-optimal factors ``L ⊗ R`` (aggregated over the
  batches as ``aggregation`` says), decomposed as laplace-torch's ``Kron`` is
  (``hessian_structure="kfoc"``);
* :class:`KFACFactors` — K-FAC's factors of the same per-sample quantities (KFC for weights
  shared over positions), the reference;
* :class:`EigenCorrection` — any factors' eigenbasis ``U_L ⊗ U_R`` with the data set's
  own eigenvalues in it, ``S[i, j] = Σ_k ((U_Lᵀ X_k U_R)[i, j])²`` (one more pass over
  the data, :func:`~kfoc_backpack.dataset.correction.corrected_eigenvalues`):
  ``EigenCorrection(KFOCFactors(...))`` is the eigenvalue-corrected K-FOC
  (``"ekfoc"``), ``EigenCorrection(KFACFactors())`` EK-FAC (``"ekfac"``).

The next approximation is one more sibling: a ``fit`` and a ``decompose``. The maths of
the correction: docs/conventions.md §9.

"Raw" blocks are the curvature of the *summed* loss, without laplace-torch's likelihood
``factor`` (which the caller applies): weights ``[L_out, R_in]`` with
``tr(R_in) = (1/N) Σ_n ‖â_n‖²`` (K-FAC's split), biases ``[B]``. Index conventions:
``N`` inputs of the data set, ``M``/``I`` a weight's rows/columns.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from laplace.utils import Kron, KronDecomposed
from torch import Tensor

from kfoc_backpack.dataset import OptimalOptions
from kfoc_backpack.dataset.correction import corrected_eigenvalues
from kfoc_backpack.dataset.distributed import Communication, Reducer
from kfoc_backpack.laplace.aggregate import BatchBlocks, check_aggregation, fit_factors
from kfoc_backpack.laplace.backend import KFOCKronMixin
from kfoc_backpack.laplace.eigen_corrected import EigenCorrectedDecomposed
from kfoc_backpack.solver.correction import EigenCorrected, eigenbases


@dataclass
class FitJob:
    """What every pass of one fit shares.

    Attributes:
        backend: The curvature backend (model, likelihood, curvature target).
        loader: This rank's batches.
        split: ``batch -> (X, y)`` on the parameters' device, checked
            (:func:`~kfoc_backpack.laplace.aggregate.batch_splitter`).
        check_batch: The check ``split`` applies (for :func:`fit_factors`).
        reducer: The ``torch.distributed`` reductions (inactive in one process).
        progress_bar: Show tqdm progress bars.
        owner: The Laplace class, for messages.
        seed: Base seed of the Monte-Carlo labels when a later pass must see the same
            Fisher as the first (``None``: torch's global generator as it runs).
    """

    backend: KFOCKronMixin
    loader: Iterable
    split: Callable[[object], tuple[object, Tensor]]
    check_batch: Callable[[Tensor, Tensor], None] | None
    reducer: Reducer
    progress_bar: bool
    owner: str
    seed: int | None = None


@dataclass
class Fitted:
    """The raw curvature of one fit (or of the fits so far, online).

    Attributes:
        loss: Summed loss over this fit's data (all ranks), without ``factor``.
        blocks: Per trainable parameter (the backend's order) ``[L_out, R_in]`` or
            ``[B]``, of all data so far: the factors (for :class:`EigenCorrection`:
            those whose eigenbasis it keeps).
        num_samples: Inputs of this fit's data (all ranks); for ``earlier``, of the
            earlier data.
        communication: Collectives and bytes this rank sent.
        corrected: Per trainable parameter the weight's :class:`EigenCorrected` block
            (raw ``S``) or ``None`` (biases; approximations without a correction).
    """

    loss: Tensor
    blocks: list[list[Tensor]]
    num_samples: int
    communication: Communication
    corrected: list[EigenCorrected | None] = field(default_factory=list)


class Approximation(ABC):
    """A Kronecker-factored approximation of the curvature, fitted over a data set."""

    structure: str
    """laplace-torch's ``hessian_structure`` name of the approximation."""

    aggregation: str
    """How per-batch factors are aggregated over the data set (docs/conventions.md §4)."""

    supports_damping = True
    """Whether laplace-torch's ``damping`` (``√δ`` added to each factor) applies."""

    def check_damping(self, damping: bool, owner: str) -> None:
        """Refuse ``damping=True`` where it does not apply, naming why.

        Raises:
            ValueError: For ``damping=True`` on an approximation without factor
                eigenvalues.
        """
        if damping and not self.supports_damping:
            raise ValueError(
                f"{owner} (hessian_structure={self.structure!r}): damping=True adds √δ to "
                "each Kronecker factor's eigenvalues, which eigenvalue-corrected blocks do "
                "not have; use damping=False (the prior precision is added to every "
                "eigenvalue)."
            )

    @abstractmethod
    def fit(self, job: FitJob, earlier: Fitted | None = None) -> Fitted:
        """Raw curvature of ``job``'s data, including ``earlier`` (online) if given.

        ``earlier.blocks`` and ``earlier.corrected`` are the raw curvature of the data
        of earlier fits (``earlier.num_samples`` inputs), the same on every rank.
        """

    def decompose(
        self, fitted: Fitted, factor: float, damping: bool
    ) -> tuple[Kron, KronDecomposed]:
        """``(H_facs, H)``: laplace-torch's factors and decomposition, times ``factor``."""
        H_facs = Kron([list(block) for block in fitted.blocks]) * factor
        return H_facs, H_facs.decompose(damping=damping)

    def describe(self) -> str:
        """Short name for messages."""
        return self.structure


def _factors(
    job: FitJob,
    earlier: Fitted | None,
    aggregation: str,
    options: OptimalOptions | None = None,
    per_batch: BatchBlocks | None = None,
) -> Fitted:
    """:func:`fit_factors` over ``job``'s data, ``earlier``'s blocks as its prior."""
    names = list(job.backend.named_trainable)
    prior = None
    if earlier is not None:
        prior = {name: (block, earlier.num_samples) for name, block in zip(names, earlier.blocks)}
    raw = fit_factors(
        job.backend,
        job.loader,
        aggregation,
        prior=prior,
        check_batch=job.check_batch,
        progress_bar=job.progress_bar,
        options=options,
        owner=job.owner,
        process_group=job.reducer,
        seed=job.seed,
        per_batch=per_batch,
    )
    return Fitted(raw.loss, raw.blocks, raw.num_samples, raw.communication)


@dataclass
class KFOCFactors(Approximation):
    """K-FOC's Frobenius-optimal factors, aggregated over batches (and ranks).

    Args:
        aggregation: ``"running"``, ``"approx"`` or ``"optimal"`` (docs/conventions.md §4).
        options: Options of ``"optimal"``.
    """

    aggregation: str = "running"
    options: OptimalOptions = field(default_factory=OptimalOptions)
    structure = "kfoc"

    def describe(self) -> str:
        """``"kfoc (running)"`` and the like."""
        return f"kfoc ({self.aggregation})"

    def __post_init__(self) -> None:
        self.aggregation = check_aggregation(self.aggregation)

    def fit(self, job: FitJob, earlier: Fitted | None = None) -> Fitted:
        """K-FOC's data-set factors; earlier factors enter the aggregation as one term."""
        return _factors(job, earlier, self.aggregation, options=self.options)


@dataclass
class KFACFactors(Approximation):
    """K-FAC's factors from the same per-sample quantities: ``Σ_p L_p`` and ``Σ_p (n_p/N) R_p``.

    The data set's K-FAC (KFC for weights shared over positions) whatever the batches:
    left factors are summed, right factors averaged over the inputs; biases exact.
    """

    structure = "kfac"
    aggregation = "approx"
    """K-FAC's own definition: factor-wise sums over the batches."""

    def fit(self, job: FitJob, earlier: Fitted | None = None) -> Fitted:
        """K-FAC's data-set factors; earlier factors are added (weighted by inputs)."""
        return _factors(job, earlier, "approx", per_batch=job.backend.kfac)


def project_eigenvalues(old: EigenCorrected, left_basis: Tensor, right_basis: Tensor) -> Tensor:
    r"""Return the diagonal of an eigenvalue-corrected block in another basis.

    ``S'[i, j] = Σ_{a,b} C_L[i, a] S[a, b] C_R[j, b]`` with ``C = (U_newᵀ U_old)^{∘2}``:
    the Frobenius projection of ``old``'s block onto the matrices with eigenbasis
    ``left_basis ⊗ right_basis`` (trace kept: ``C`` is doubly stochastic).

    Args:
        old: The earlier block (``S`` ``[M, I]``).
        left_basis: ``[M, M]`` new ``U_L``.
        right_basis: ``[I, I]`` new ``U_R``.

    Returns:
        ``[M, I]`` ``S'``.
    """
    left = (left_basis.mT @ old.left_basis.to(left_basis)).square()
    right = (right_basis.mT @ old.right_basis.to(right_basis)).square()
    return left @ old.diagonal.to(left_basis) @ right.mT


@dataclass
class EigenCorrection(Approximation):
    """The eigenbasis of ``basis``'s factors with the data set's own eigenvalues in it.

    Per weight: ``(U_L ⊗ U_R) diag(vec S) (U_L ⊗ U_R)ᵀ``, ``S`` the exact diagonal of the
    data set's block in that basis — never farther from the block in the Frobenius
    norm than ``L ⊗ R``, and trace-exact. One pass over the data after ``basis``'s fit,
    under the same Monte-Carlo labels. Biases stay exact. Online, the earlier ``S`` is
    projected onto the new basis (:func:`project_eigenvalues`) and the new data's added.

    Args:
        basis: The approximation whose factors give the eigenbasis (:class:`KFOCFactors` or
            :class:`KFACFactors`).
    """

    basis: Approximation
    supports_damping = False

    @property
    def structure(self) -> str:  # type: ignore[override]
        """``"ekfoc"``, ``"ekfac"``: ``"e"`` and the basis's name."""
        return "e" + self.basis.structure

    @property
    def aggregation(self) -> str:
        """The basis's aggregation of factors over batches."""
        return self.basis.aggregation

    def fit(self, job: FitJob, earlier: Fitted | None = None) -> Fitted:
        """Fit the basis's factors, then ``S`` in one pass (plus the earlier ``S`` projected)."""
        backend = job.backend
        if backend.stochastic and job.seed is None:  # both passes draw the same labels
            job = replace(job, seed=job.reducer.shared_seed(None))
        fitted = self.basis.fit(job, earlier)
        params = backend.named_trainable
        bases = {
            name: eigenbases(*block)
            for name, block in zip(params, fitted.blocks)
            if len(block) == 2
        }
        diagonals = corrected_eigenvalues(
            backend.collect,
            bases,
            params,
            job.loader,
            split=job.split,
            stochastic=backend.stochastic,
            seed=job.seed,
            reduction="sum",
            progress_bar=job.progress_bar,
            process_group=job.reducer,
        )
        previous = dict(zip(params, earlier.corrected)) if earlier is not None else {}
        corrected: list[EigenCorrected | None] = []
        for name in params:
            if name not in bases:
                corrected.append(None)
                continue
            left, right = bases[name]
            diagonal = diagonals[name]
            if previous.get(name) is not None:
                diagonal = diagonal + project_eigenvalues(previous[name], left, right)
            corrected.append(EigenCorrected(left, right, diagonal))
        return replace(fitted, corrected=corrected)

    def decompose(
        self, fitted: Fitted, factor: float, damping: bool
    ) -> tuple[Kron, KronDecomposed]:
        """``H_facs`` the basis's factors; ``H`` the corrected blocks, times ``factor``."""
        self.check_damping(damping, "EigenCorrection.decompose")
        H_facs = Kron([list(block) for block in fitted.blocks]) * factor
        blocks: list[EigenCorrected | Tensor] = []
        for block, corrected in zip(H_facs.kfacs, fitted.corrected):
            if corrected is None:  # a bias: its exact block
                blocks.append(block[0])
            else:
                blocks.append(replace(corrected, diagonal=corrected.diagonal * factor))
        return H_facs, EigenCorrectedDecomposed.from_blocks(blocks)

    def describe(self) -> str:
        """``"ekfoc: kfoc (running)"`` and the like."""
        return f"{self.structure}: {self.basis.describe()}"
