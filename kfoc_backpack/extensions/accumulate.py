r"""Aggregation of K-FOC factors over the batches of a data set (docs/conventions.md §4).

For users of the plain BackPACK extensions:

* :class:`KFOCAccumulator` — fed after every ``backward`` with ``KFOC``/``KFOCExact``,
  it aggregates each parameter's per-batch blocks with ``"approx"`` (the paper's
  K-FOC_approx) or ``"running"`` (K-FOC_running);
* :func:`optimal_factors` — the Frobenius-optimal factors of the whole data set,
  by the power method over the data (two passes per iteration) or over per-sample
  terms stored in memory when they fit, warm-started from ``"running"``.

Conventions: a weight's result is ``[L_out, R_in]`` in K-FAC's scale split,
``tr(R_in) = (1/N) Σ_n ‖â_n‖²`` over all ``N`` inputs of the data set, a bias's is
its exact block ``[B]``. The target is the data-set GGN/Fisher for the loss as the
user reduced it per batch: ``Σ_p F_p`` for ``reduction="sum"`` and
``Σ_p n_p F_p / N`` (the data-set mean) for ``reduction="mean"``. Batches are
weighted by their sample count ``n_p``, never by batch count.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import tqdm
from backpack import backpack, extend, memory_cleanup
from backpack.context import CTX
from torch import Tensor
from torch.nn import Module, Parameter
from torch.utils.data import RandomSampler

from kfoc_backpack.collect.layers import LayerTerms, kfac_scale_split
from kfoc_backpack.collect.route import BatchQuantities
from kfoc_backpack.extensions.kfoc import KFOCTerms
from kfoc_backpack.solver import (
    KroneckerAccumulator,
    KroneckerFactors,
    SolverOptions,
    nearest_kronecker_terms,
)
from kfoc_backpack.solver._common import finalize

ACCUMULATOR_AGGREGATIONS = ("approx", "running")
"""Aggregations an accumulator fed with per-batch factors can run."""

REDUCTIONS = ("mean", "sum")

DEFAULT_MAX_MEMORY = 1 << 30
"""Bytes of per-sample terms :func:`optimal_factors` keeps in memory by default."""


def check_choice(value: str, name: str, choices: Sequence[str], hint: str = "") -> str:
    """Return ``value`` if it is one of ``choices``, else raise naming the argument.

    Raises:
        ValueError: For a value not in ``choices``.
    """
    if value not in choices:
        supported = ", ".join(repr(c) for c in choices)
        raise ValueError(f"Unknown {name} {value!r}; supported: {supported}.{hint}")
    return value


# --------------------------------------------------------------------------------------
# Temporary BackPACK extension
# --------------------------------------------------------------------------------------


@contextmanager
def extended(*modules: Module) -> Iterator[None]:
    """Extend ``modules`` with BackPACK inside the block and undo it afterwards.

    BackPACK's ``extend`` installs hooks in place, and an extended model no longer
    works with ``torch.func`` (docs/conventions.md §6). Here only the hooks this call installs are
    removed again, so a model the user extended stays extended, and one that was not
    is left exactly as it was (inputs/outputs stored by BackPACK are deleted).
    """
    flagged = {
        id(m) for mod in modules for m in mod.modules() if getattr(m, "_backpack_extend", False)
    }
    start = len(CTX.hook_handles)
    try:
        for module in modules:
            extend(module)
        yield
    finally:
        added = CTX.hook_handles[start:]
        added_ids = {id(handle) for handle in added}
        for handle in added:
            handle.remove()
        CTX.hook_handles = [h for h in CTX.hook_handles if id(h) not in added_ids]
        for module in modules:
            for sub in module.modules():
                if id(sub) not in flagged and getattr(sub, "_backpack_extend", False):
                    sub._backpack_extend = False
                memory_cleanup(sub)


# --------------------------------------------------------------------------------------
# Per-parameter accumulation of per-batch blocks
# --------------------------------------------------------------------------------------


class BlockAccumulator:
    """Aggregate of one parameter's per-batch blocks, ``Σ_p s_p F_p``.

    A weight block arrives as K-FOC factors ``[L_p, R_p]`` (``F_p ≈ L_p ⊗ R_p``, K-FAC
    scale split over the ``n_p`` inputs of the batch), a bias block as ``[B_p]``
    (exact). Weight blocks are combined by :class:`~kfoc_backpack.solver.KroneckerAccumulator`
    with sample-count weights, so the input-side factor keeps K-FAC's split over all
    inputs seen; bias blocks are summed.

    Args:
        aggregation: ``"approx"`` or ``"running"``.
    """

    def __init__(self, aggregation: str = "running"):
        self.aggregation = check_choice(
            aggregation,
            "aggregation",
            ACCUMULATOR_AGGREGATIONS,
            " The data-set optimum needs the per-sample terms: use optimal_factors().",
        )
        self._kron: KroneckerAccumulator | None = None
        self._sum: Tensor | None = None
        self.num_samples = 0

    def update(self, block: Sequence[Tensor], num_samples: int, scale: float = 1.0) -> None:
        """Add ``scale · F_p`` for one batch.

        Args:
            block: ``[L_p, R_p]`` (``[M, M]``, ``[N, N]``) or ``[B_p]`` (``[M, M]``).
            num_samples: Number of inputs ``n_p ≥ 1`` of the batch.
            scale: Weight ``s_p`` of the batch's block in the target.

        Raises:
            ValueError: For a block that is neither one nor two matrices, a change
                between the two kinds, or ``num_samples < 1``.
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}.")
        self.num_samples += int(num_samples)
        if len(block) == 2:
            if self._sum is not None:
                raise ValueError("A parameter's blocks changed from [B] to [L, R].")
            if self._kron is None:
                self._kron = KroneckerAccumulator(self.aggregation)
            left, right = block
            self._kron.update(left, right, weight=num_samples, scale=scale)
        elif len(block) == 1:
            if self._kron is not None:
                raise ValueError("A parameter's blocks changed from [L, R] to [B].")
            term = block[0] * scale
            self._sum = term if self._sum is None else self._sum + term
        else:
            raise ValueError(f"Expected a block [L, R] or [B], got {len(block)} matrices.")

    @property
    def empty(self) -> bool:
        """Whether nothing was added yet."""
        return self._kron is None and self._sum is None

    def factors(self) -> list[Tensor]:
        """``[L, R]`` (K-FAC split over all inputs seen) or ``[B]``.

        Raises:
            RuntimeError: If nothing was added yet.
        """
        if self._kron is not None:
            return list(self._kron.factors(normalize=False))
        if self._sum is not None:
            return [self._sum]
        raise RuntimeError("BlockAccumulator.factors() called before any update().")


class KFOCAccumulator:
    """Aggregate the K-FOC factors of a model over the batches of a data set.

    Call :meth:`update` after each ``backward`` inside ``with backpack(KFOC())`` (or
    ``KFOCExact()``); :meth:`factors` returns, per trainable parameter, the data-set
    factors ``[L_out, R_in]`` (weights) or the exact block ``[B]`` (biases)::

        acc = KFOCAccumulator(model, aggregation="running")
        for X, y in loader:
            with backpack(KFOCExact()):
                lossfunc(model(X), y).backward()
            acc.update(len(X))
        factors = acc.factors()        # {"0.weight": [L, R], "0.bias": [B], ...}

    Args:
        model: The (extended) model.
        aggregation: ``"running"`` (default, the paper's K-FOC_running: after each
            batch the optimal Kronecker product of the running estimate plus the
            batch) or ``"approx"`` (K-FOC_approx: factor-wise sums as in K-FAC).
            The data-set optimum needs per-sample terms: :func:`optimal_factors`.
        savefield: The extension's savefield, ``"kfoc"`` (``KFOC``) or
            ``"kfoc_exact"`` (``KFOCExact``).
        reduction: How the loss was reduced over each batch: ``"mean"`` (default;
            the result approximates the data-set mean ``Σ_p n_p F_p / N``) or
            ``"sum"`` (the data-set sum ``Σ_p F_p``).

    Raises:
        ValueError: For an unknown ``aggregation`` or ``reduction``.
    """

    def __init__(
        self,
        model: Module,
        aggregation: str = "running",
        savefield: str = "kfoc",
        reduction: str = "mean",
    ):
        check_choice(
            aggregation,
            "aggregation",
            ACCUMULATOR_AGGREGATIONS,
            " For the data-set optimum use optimal_factors().",
        )
        self.reduction = check_choice(reduction, "reduction", REDUCTIONS)
        self.aggregation = aggregation
        self.savefield = savefield
        self._params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self._blocks = {name: BlockAccumulator(aggregation) for name in self._params}
        self.num_samples = 0

    def update(self, num_samples: int) -> None:
        """Add the current batch, read from every parameter's savefield.

        Call once per batch, after its backward pass; parameters without the
        savefield (skipped layers) are left out.

        Args:
            num_samples: Number of inputs of the batch.

        Raises:
            TypeError: If the savefield holds per-sample terms (``KFOCTerms``).
            RuntimeError: If no parameter holds the savefield.
        """
        found = False
        scale = 1.0 if self.reduction == "sum" else float(num_samples)
        for name, param in self._params.items():
            block = getattr(param, self.savefield, None)
            if block is None:
                continue
            if isinstance(block, LayerTerms):
                raise TypeError(
                    f"'{name}.{self.savefield}' holds per-sample terms (KFOCTerms); "
                    "aggregate those with optimal_factors(), or use KFOC/KFOCExact here."
                )
            self._blocks[name].update(block, num_samples, scale)
            found = True
        if not found:
            raise RuntimeError(
                f"No trainable parameter has '.{self.savefield}'. Call update() after a "
                "backward pass inside `with backpack(ext)` where ext is KFOC() (savefield "
                "'kfoc') or KFOCExact() (savefield 'kfoc_exact')."
            )
        self.num_samples += int(num_samples)

    def factors(self) -> dict[str, list[Tensor]]:
        """Return the aggregated ``[L_out, R_in]`` or ``[B]`` per parameter name.

        Raises:
            RuntimeError: If :meth:`update` was never called.
        """
        if self.num_samples == 0:
            raise RuntimeError("KFOCAccumulator.factors() called before any update().")
        result = {}
        for name, block in self._blocks.items():
            if block.empty:
                continue
            factors = block.factors()
            if self.reduction == "mean":
                factors[0] = factors[0] / self.num_samples
            result[name] = factors
        return result


# --------------------------------------------------------------------------------------
# Data-set optimum
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KroneckerTerm:
    """A single product ``L ⊗ R`` with the half-steps of the power method.

    Used to add an earlier approximation (e.g. of previous data in an online fit)
    to the target of the data-set optimum.
    """

    left: Tensor
    right: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        """``(M, N)``: sizes of the left and right factors."""
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


@dataclass(frozen=True)
class OptimalFactors:
    """Result of :func:`optimal_factors`.

    Attributes:
        factors: Per parameter name, ``[L_out, R_in]`` (weights, K-FAC split over all
            inputs) or ``[B]`` (biases, exact).
        loss: Sum over the batches of the loss values (first pass).
        num_samples: Number of inputs in one pass over the data.
        passes: Passes over the data, the first one included.
        iterations: Largest number of power iterations of any weight.
        converged: Whether every weight reached the tolerance.
        stored: Whether the per-sample terms were kept in memory.
    """

    factors: dict[str, list[Tensor]]
    loss: Tensor
    num_samples: int
    passes: int
    iterations: int
    converged: bool
    stored: bool


BatchCollector = Callable[[object, Tensor], BatchQuantities]
"""``collect(X, y) -> BatchQuantities``: one batch's loss, number of inputs and, per
parameter name, :class:`LayerTerms` (weights) or ``[B]`` (biases)."""

BatchSplitter = Callable[[object], tuple[object, Tensor]]
"""``split(batch) -> (X, y)``: model input and targets of a batch from the loader."""


@contextmanager
def preserved_grads(params: Iterable[Tensor]) -> Iterator[None]:
    """Restore the parameters' ``.grad`` after the block (curvature passes leave no trace)."""
    params = list(params)
    saved = [p.grad for p in params]
    for param in params:  # backward would accumulate into the saved tensors in place
        param.grad = None
    try:
        yield
    finally:
        for param, grad in zip(params, saved):
            param.grad = grad


def _batch_size(X: object) -> int:
    """Return the number of inputs of a batch; only tensor inputs are supported."""
    if isinstance(X, Tensor):
        return int(X.shape[0])
    raise ValueError(
        "K-FOC needs batches (X, y) of tensors (BackPACK does not support dict-like "
        f"inputs), got X of type {type(X).__name__}."
    )


def _split_batch(batch: object) -> tuple[Tensor, Tensor]:
    if isinstance(batch, Sequence) and len(batch) == 2:
        X, y = batch
        _batch_size(X)
        return X, y
    raise ValueError(
        "K-FOC needs batches (X, y) of tensors (BackPACK does not support dict-like "
        f"inputs), got a batch of type {type(batch).__name__}."
    )


def _normalized(mat: Tensor) -> tuple[Tensor, Tensor]:
    norm = torch.linalg.matrix_norm(mat)
    return mat / torch.where(norm > 0, norm, torch.ones_like(norm)), norm


class _WeightState:
    """Book-keeping of one weight during the data-set optimum."""

    def __init__(self, init: Tensor | None):
        self.running = BlockAccumulator("running") if init is None else None
        self.left: Tensor | None = None if init is None else _normalized(init)[0]
        self.right: Tensor | None = None
        self.acc: Tensor | None = None
        self.terms: list = []
        self.scales: list[float] = []
        self.trace_sum: Tensor | float = 0.0
        self.prior: KroneckerTerm | None = None
        self.converged = False
        self.iterations = 0

    def add(self, term: Tensor) -> None:
        self.acc = term if self.acc is None else self.acc + term

    def take(self) -> Tensor:
        acc, self.acc = self.acc, None
        if acc is None:  # the layer saw no data (all-zero block)
            raise RuntimeError("K-FOC: a weight received no per-sample terms in a pass.")
        return acc


class _OptimalSolver:
    """The power method for the data-set optimum, see :func:`solve_optimal`."""

    def __init__(
        self,
        collect: BatchCollector,
        split: BatchSplitter,
        params: dict[str, Parameter],
        loader: Iterable,
        *,
        stochastic: bool,
        reduction: str,
        options: SolverOptions,
        store_terms: bool | None,
        max_memory: int,
        seed: int | None,
        progress_bar: bool,
    ):
        self.collect, self.split, self.params, self.loader = collect, split, params, loader
        self.stochastic, self.reduction = stochastic, reduction
        self.options, self.max_memory, self.progress_bar = options, max_memory, progress_bar
        self.store_terms = store_terms
        self.store = store_terms is not False
        self.seed = seed
        if stochastic and seed is None:
            self.seed = int(torch.randint(0, 2**31 - 1, ()).item())
        self.weights: dict[str, _WeightState] = {}
        self.biases: dict[str, Tensor] = {}
        self.loss: Tensor | float = 0.0
        self.num_samples = 0
        self.passes = 0
        self.stored_bytes = 0

    def _pass(self, visit: Callable[[int, Tensor, dict], None]) -> None:
        """One pass over the data; ``visit(num, loss, quantities)`` per batch."""
        self.passes += 1
        desc = f"[K-FOC optimal: pass {self.passes}]"
        devices = sorted({p.device.index or 0 for p in self.params.values() if p.is_cuda})
        for index, batch in enumerate(
            tqdm.tqdm(self.loader, desc=desc, disable=not self.progress_bar)
        ):
            X, y = self.split(batch)
            if not self.stochastic:
                result = self.collect(X, y)
            else:  # the same labels in every pass: a per-batch seed, global RNG untouched
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(self.seed + index)
                    result = self.collect(X, y)
            visit(result.num_samples, result.loss, result.quantities)

    def _scale(self, num: int) -> float:
        return 1.0 if self.reduction == "sum" else float(num)

    def _first_visit(self, init: dict[str, Tensor]):
        def visit(num: int, loss: Tensor, quantities: dict) -> None:
            self.loss = self.loss + loss
            self.num_samples += num
            scale = self._scale(num)
            for name, value in quantities.items():
                if not isinstance(value, LayerTerms):
                    term = value[0] * scale
                    self.biases[name] = (
                        term if name not in self.biases else self.biases[name] + term
                    )
                    continue
                state = self.weights.get(name)
                if state is None:
                    state = self.weights[name] = _WeightState(init.get(name))
                state.trace_sum = state.trace_sum + num * value.input_trace
                if state.running is not None:
                    batch_optimum = value.terms.solve(SolverOptions())
                    state.running.update(value.kfoc(batch_optimum), num, scale)
                else:
                    state.left = state.left.to(value.input_trace)
                    state.add(value.terms.to_right(state.left) * scale)
                self._keep(state, value, scale)

        return visit

    def _keep(self, state: _WeightState, value: LayerTerms, scale: float) -> None:
        if not self.store:
            return
        self.stored_bytes += value.terms.nbytes()
        if self.store_terms is None and self.stored_bytes > self.max_memory:
            self.store = False
            for other in self.weights.values():
                other.terms.clear()
                other.scales.clear()
            return
        state.terms.append(value.terms.detach())
        state.scales.append(scale)

    def _add_prior(self, prior: dict[str, tuple[list[Tensor], int]]) -> int:
        num_prior = 0
        for name, (block, num) in prior.items():
            num_prior = max(num_prior, int(num))
            if len(block) == 1:
                bias = self.biases.get(name)
                self.biases[name] = block[0] if bias is None else bias + block[0]
                continue
            state = self.weights.get(name)
            if state is None:
                continue
            left, right = block
            state.prior = KroneckerTerm(left, right)
            state.trace_sum = state.trace_sum + num * torch.diagonal(right).sum()
            if state.running is not None:
                state.running.update([left, right], num, 1.0)
            else:
                state.add(state.prior.to_right(state.left))
        return num_prior

    def _start(self, state: _WeightState) -> None:
        """Set the start: direction ``left`` (unit norm), ``right`` scaled to match."""
        if state.running is not None:
            left, right = state.running.factors()
            state.left, norm = _normalized(left)
            state.right = right * norm
        else:
            state.right = state.take()

    def _solve_stored(self, state: _WeightState) -> None:
        terms, scales = list(state.terms), list(state.scales)
        if state.prior is not None:
            terms.append(state.prior)
            scales.append(1.0)
        result = nearest_kronecker_terms(terms, scales, options=self.options, init=state.left)
        state.left, state.right = result.left, result.right
        state.converged, state.iterations = result.converged, result.iterations
        state.terms.clear()

    def _stream(self, max_passes: int) -> None:
        active = [s for s in self.weights.values()]

        def visit_right(num: int, loss: Tensor, quantities: dict) -> None:
            for name, state in self.weights.items():
                if not state.converged and name in quantities:
                    state.add(quantities[name].terms.to_right(state.left) * self._scale(num))

        def visit_left(num: int, loss: Tensor, quantities: dict) -> None:
            for name, state in self.weights.items():
                if not state.converged and name in quantities:
                    state.add(quantities[name].terms.to_left(state.right) * self._scale(num))

        while active and self.passes < max_passes:
            self._pass(visit_right)
            for state in active:
                if state.prior is not None:
                    state.add(state.prior.to_right(state.left))
                state.right = state.take()  # optimal scale for the direction ``left``
            if self.passes >= max_passes:
                break
            for state in active:
                state.right = _normalized(state.right)[0]
            self._pass(visit_left)
            for state in active:
                if state.prior is not None:
                    state.add(state.prior.to_left(state.right))
                new_left, norm = _normalized(state.take())
                delta = torch.linalg.matrix_norm(new_left - state.left)
                state.left, state.right = new_left, state.right * norm
                state.iterations += 1
                state.converged = bool(delta < self.options.tol)
            active = [s for s in active if not s.converged]

    def solve(self, init, prior, max_passes: int) -> OptimalFactors:
        self._pass(self._first_visit(init))
        if self.num_samples == 0:
            raise ValueError("optimal_factors: the loader yielded no batches.")
        num_prior = self._add_prior(prior)
        for state in self.weights.values():
            self._start(state)
        if self.store:
            for state in self.weights.values():
                self._solve_stored(state)
        else:
            if self.stochastic and isinstance(getattr(self.loader, "sampler", None), RandomSampler):
                warnings.warn(
                    "optimal_factors streams a shuffling loader with the Monte-Carlo Fisher: "
                    "each pass then pairs the per-batch label seeds with other inputs and the "
                    "power method targets a moving Fisher. Use a loader without shuffling.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            self._stream(max_passes)
        return self._result(num_prior)

    def _result(self, num_prior: int) -> OptimalFactors:
        factors: dict[str, list[Tensor]] = {}
        total_inputs = self.num_samples + num_prior
        mean = self.reduction == "mean"
        for name in self.params:
            if name in self.weights:
                state = self.weights[name]
                left, right = finalize(state.left, state.right, state.left.dtype)
                pair = kfac_scale_split(
                    KroneckerFactors(left, right, 0, True), state.trace_sum / total_inputs
                )
                if mean:
                    pair[0] = pair[0] / self.num_samples
                factors[name] = pair
            elif name in self.biases:
                bias = self.biases[name]
                factors[name] = [bias / self.num_samples if mean else bias]
        converged = all(s.converged for s in self.weights.values())
        iterations = max((s.iterations for s in self.weights.values()), default=0)
        if not converged:
            warnings.warn(
                f"K-FOC optimal aggregation stopped (max_passes={self.options.max_iter}) "
                f"before reaching tol={self.options.tol:g} for some weights; the factors "
                "are the last iterate. Increase max_passes or store the terms in memory.",
                RuntimeWarning,
                stacklevel=3,
            )
        loss = torch.as_tensor(self.loss)
        return OptimalFactors(
            factors, loss, self.num_samples, self.passes, iterations, converged, self.store
        )


def solve_optimal(
    collect: BatchCollector,
    params: dict[str, Parameter],
    loader: Iterable,
    *,
    split: BatchSplitter | None = None,
    stochastic: bool = False,
    reduction: str = "sum",
    init: dict[str, Tensor] | None = None,
    prior: dict[str, tuple[list[Tensor], int]] | None = None,
    tol: float = 1e-6,
    max_passes: int = 50,
    store_terms: bool | None = None,
    max_memory: int = DEFAULT_MAX_MEMORY,
    seed: int | None = None,
    progress_bar: bool = False,
) -> OptimalFactors:
    """Data-set-optimal K-FOC factors from a caller-supplied batch collector.

    The engine of :func:`optimal_factors` (BackPACK's route) and of laplace-torch's
    ``aggregation="optimal"`` (the hook route). The first pass collects every batch's
    per-sample terms, exact bias blocks and loss, and the warm start: the running
    aggregate of the per-batch optima (or ``init``). Then, per weight, the power
    method for ``F = Σ_p s_p F_p (+ prior)`` runs over the terms kept in memory when
    they fit, else over the data, two passes per iteration; with a stochastic target
    (Monte-Carlo labels) every batch is collected under a per-batch seed, so every
    pass sees the same Fisher.

    Args:
        collect: ``collect(X, y) -> BatchQuantities``, see :data:`BatchCollector`.
        params: The parameters to approximate, by name.
        loader: Re-iterable batches.
        split: ``split(batch) -> (X, y)`` (default: ``(X, y)`` pairs of tensors).
        stochastic: Whether ``collect`` draws random labels (Monte-Carlo Fisher).
        reduction: The loss reduction per batch: ``"sum"`` (target ``Σ_p F_p``) or
            ``"mean"`` (target ``Σ_p n_p F_p / N``).
        init: Optional warm start ``[M, M]`` of the left factor per weight name
            (default: the running aggregate, computed in the first pass).
        prior: Optional earlier approximation per name for an online update,
            ``([L, R] or [B], n)``: its product is added to the target and its ``n``
            inputs count in the K-FAC split. Only with ``reduction="sum"``.
        tol: Stop once the unit-norm left factor changes by less than ``tol``
            (Frobenius norm) in an iteration.
        max_passes: Cap on iterations over stored terms, or on passes over the data
            (the first one included) when streaming.
        store_terms: Keep the terms in memory (``True``), stream (``False``), or keep
            them while they fit in ``max_memory`` bytes (``None``, default).
        max_memory: Byte budget for the stored terms when ``store_terms`` is ``None``.
        seed: Base seed of the Monte-Carlo labels (default: drawn from torch's
            global generator).
        progress_bar: Show a tqdm progress bar per pass.

    Returns:
        The optimal factors and diagnostics.

    Raises:
        ValueError: For invalid arguments, an empty loader or malformed batches.
    """
    check_choice(reduction, "reduction", REDUCTIONS)
    if int(max_passes) != max_passes or max_passes < 1:
        raise ValueError(f"max_passes must be a positive integer, got {max_passes!r}.")
    if prior and reduction != "sum":
        raise ValueError("prior is only supported with reduction='sum'.")
    init = {name: (v[0] if isinstance(v, (list, tuple)) else v) for name, v in (init or {}).items()}
    solver = _OptimalSolver(
        collect,
        _split_batch if split is None else split,
        dict(params),
        loader,
        stochastic=stochastic,
        reduction=reduction,
        options=SolverOptions(tol=tol, max_iter=int(max_passes)),
        store_terms=store_terms,
        max_memory=max_memory,
        seed=seed,
        progress_bar=progress_bar,
    )
    return solver.solve(init, dict(prior or {}), int(max_passes))


def optimal_factors(
    model: Module,
    lossfunc: Module,
    loader: Iterable,
    *,
    exact: bool = True,
    mc_samples: int = 1,
    init: dict[str, Tensor] | None = None,
    tol: float = 1e-6,
    max_passes: int = 50,
    store_terms: bool | None = None,
    max_memory: int = DEFAULT_MAX_MEMORY,
    seed: int | None = None,
    progress_bar: bool = False,
) -> OptimalFactors:
    """Frobenius-optimal K-FOC factors of a whole data set (docs/conventions.md §4, ``"optimal"``).

    For every trainable weight, the ``L_out ⊗ R_in`` closest to the data-set block of
    the GGN (``exact=True``, the ``KFOCExact`` target) or Monte-Carlo Fisher (the
    ``KFOC`` target) for the loss as ``lossfunc`` reduces it: ``Σ_p F_p`` for
    ``reduction="sum"``, the data-set mean ``Σ_p n_p F_p / N`` for ``"mean"``. It is
    the lower bound for ``KFOCAccumulator``'s ``"approx"`` and ``"running"``. Biases
    get their exact block. The model and loss are extended with BackPACK only while
    the function runs; ``.grad`` of the parameters is left as it was::

        result = optimal_factors(model, torch.nn.CrossEntropyLoss(), loader)
        L, R = result.factors["0.weight"]

    Args:
        model: The model (only ``Linear``/``Conv1d``/``Conv2d``/``Conv3d`` layers may
            have trainable parameters).
        lossfunc: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss`` with
            ``reduction`` ``"mean"`` or ``"sum"``.
        loader: Re-iterable batches ``(X, y)`` of tensors (e.g. a ``DataLoader``).
        exact: Exact GGN (default) or Monte-Carlo Fisher.
        mc_samples: Sampled labels per input for the Monte-Carlo Fisher.
        init: Optional warm start of the left factor per weight name (default: the
            running aggregate of the per-batch optima).
        tol: Tolerance of the power method (change of the unit-norm left factor).
        max_passes: Cap on iterations (stored terms) or data passes (streaming).
        store_terms: ``True``/``False`` to force keeping the per-sample terms in
            memory or streaming over the data; ``None`` keeps them while they fit
            into ``max_memory`` bytes.
        max_memory: Byte budget for stored terms.
        seed: Base seed of the Monte-Carlo labels.
        progress_bar: Show tqdm progress bars.

    Returns:
        :class:`OptimalFactors`; ``.factors`` maps parameter names to ``[L, R]`` /
        ``[B]``.

    Raises:
        ValueError: For a loss without ``reduction`` ``"mean"``/``"sum"``, dict-like
            batches or invalid options.
        NotImplementedError: For a trainable layer K-FOC does not support.
    """
    reduction = getattr(lossfunc, "reduction", None)
    check_choice(reduction, "lossfunc.reduction", REDUCTIONS)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}

    def collect(X: Tensor, y: Tensor) -> BatchQuantities:
        extension = KFOCTerms(exact=exact, mc_samples=mc_samples)
        with preserved_grads(params.values()), extended(model, lossfunc), torch.enable_grad():
            loss = lossfunc(model(X), y)
            with backpack(extension):
                loss.backward()
        quantities = {}
        for name, param in params.items():
            value = getattr(param, extension.savefield, None)
            if value is not None:
                quantities[name] = value
                delattr(param, extension.savefield)
        return BatchQuantities(loss.detach(), _batch_size(X), quantities)

    return solve_optimal(
        collect,
        params,
        loader,
        stochastic=not exact,
        reduction=reduction,
        init=init,
        tol=tol,
        max_passes=max_passes,
        store_terms=store_terms,
        max_memory=max_memory,
        seed=seed,
        progress_bar=progress_bar,
    )
