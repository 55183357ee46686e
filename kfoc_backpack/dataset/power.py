r"""The power method of the data-set optimum over batches and ranks (docs/conventions.md §4, §8).

The power method for ``F = Σ_p s_p F_p (+ prior)`` over every batch of a loader — and,
under ``torch.distributed``, over every rank's loader. The first pass collects each
batch's per-sample terms, exact bias blocks and loss, and the warm start: the running
aggregate of the per-batch optima (or a given start). Then, per weight, the power
method runs over the terms kept in memory when they fit, else over the data (two passes
per iteration). Across ranks, each half-step's factor-sized partial sums of all weights
are summed in one collective and the stopping test reads the summed values, so every
rank follows the same branch. Index conventions: :mod:`kfoc_backpack.dataset.options`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import tqdm
from torch import Tensor
from torch.nn import Parameter
from torch.utils.data import RandomSampler

from kfoc_backpack.collect.hooks import BatchQuantities
from kfoc_backpack.collect.layer_terms import LayerTerms, named_failures
from kfoc_backpack.dataset.blocks import (
    BlockAccumulator,
    KroneckerTerm,
    factor_shapes,
    normalized,
    zero_block,
)
from kfoc_backpack.dataset.distributed import Communication, Reducer, combine_blocks
from kfoc_backpack.dataset.options import OptimalOptions
from kfoc_backpack.solver import KroneckerFactors, SolverOptions, nearest_kronecker_terms
from kfoc_backpack.solver.rescale import check_representable
from kfoc_backpack.solver.scale import finalize


@dataclass(frozen=True)
class OptimalFactors:
    """Result of the data-set optimum.

    Attributes:
        factors: Per parameter name, ``[L_out, R_in]`` (weights, K-FAC split over all
            inputs) or ``[B]`` (biases, exact).
        loss: Sum over the batches (of all ranks) of the loss values (first pass).
        num_samples: Number of inputs in one pass over the data (of all ranks).
        passes: Passes over the data, the first one included.
        iterations: Largest number of power iterations of any weight.
        converged: Whether every weight reached the tolerance.
        stored: Whether the per-sample terms were kept in memory.
        communication: Collectives and bytes this rank sent (zero in one process).
    """

    factors: dict[str, list[Tensor]]
    loss: Tensor
    num_samples: int
    passes: int
    iterations: int
    converged: bool
    stored: bool
    communication: Communication = field(default_factory=Communication)


BatchCollector = Callable[[object, Tensor], BatchQuantities]
"""``collect(X, y) -> BatchQuantities``: one batch's loss, number of inputs and, per
parameter name, :class:`LayerTerms` (weights) or ``[B]`` (biases)."""

BatchSplitter = Callable[[object], tuple[object, Tensor]]
"""``split(batch) -> (X, y)``: model input and targets of a batch from the loader."""


RESCALE_WINDOW = 10
"""``|exponent|`` up to which the data-set optimum iterates the terms unscaled."""


class _WeightState:
    """Book-keeping of one weight during the data-set optimum."""

    def __init__(self, init: Tensor | None):
        self.running = BlockAccumulator("running") if init is None else None
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
        self.acc = term if self.acc is None else self.acc + term

    def take(self, zeros: Tensor | None = None) -> Tensor:
        """Return the accumulated sum; ``zeros`` where only other ranks saw terms."""
        acc, self.acc = self.acc, None
        if acc is not None:
            return acc
        if zeros is None:  # the layer saw no data (all-zero block)
            raise RuntimeError("K-FOC: a weight received no per-sample terms in a pass.")
        return zeros


class OptimalSolver:
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
        options: OptimalOptions,
        seed: int | None,
        progress_bar: bool,
        reducer: Reducer,
    ):
        self.collect, self.split, self.params, self.loader = collect, split, params, loader
        self.stochastic, self.reduction, self.options = stochastic, reduction, options
        self.progress_bar, self.reducer = progress_bar, reducer
        self.store = options.store_terms is not False
        self.seed = reducer.shared_seed(seed) if stochastic else 0
        self.batch_options = SolverOptions(tol=options.tol)
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
        batches = tqdm.tqdm(self.loader, desc=desc, disable=not self.progress_bar)
        for index, batch in enumerate(batches):
            X, y = self.split(batch)
            if not self.stochastic:
                result = self.collect(X, y)
            else:  # the same labels in every pass: a per-batch seed
                with self.reducer.seeded(self.seed, index, self.params.values()):
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
                    bias = self.biases.get(name)
                    self.biases[name] = term if bias is None else bias + term
                    continue
                state = self.weights.get(name)
                if state is None:
                    state = self.weights[name] = _WeightState(init.get(name))
                state.trace_sum = state.trace_sum + num * value.input_trace
                if state.running is not None:
                    batch_optimum = value.solve(self.batch_options, what=self._what(name))
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
        if self.options.store_terms is None and self.stored_bytes > self.options.max_memory:
            self._drop_terms()
            return
        state.terms.append(value.terms.detach())
        state.scales.append(scale)

    def _drop_terms(self) -> None:
        self.store = False
        for state in self.weights.values():
            state.terms.clear()
            state.scales.clear()

    def _zeros(self, name: str, right: bool) -> Tensor | None:
        """All-zero half-step sum of ``name`` in a distributed fit (``None`` in one process)."""
        if not self.reducer.active:
            return None
        param = self.params[name]
        size = factor_shapes(param)[1 if right else 0]
        return param.new_zeros(size, size)

    def _combine(self, init: dict[str, Tensor]) -> None:
        """Sum the first pass's results over the ranks (no-op in one process)."""
        reducer = self.reducer
        if not reducer.active:
            return
        names = [n for n, p in self.params.items() if p.dim() >= 2]
        bias_names = [n for n, p in self.params.items() if p.dim() < 2]
        seen = [float(n in self.weights) for n in names] + [
            float(n in self.biases) for n in bias_names
        ]
        traces = [self.weights[n].trace_sum if n in self.weights else 0.0 for n in names]
        totals = reducer.sum_scalars([self.loss, self.num_samples, self.store, *seen, *traces])
        like = next(iter(self.params.values()))
        self.loss, self.num_samples = torch.tensor(totals[0], dtype=like.dtype), int(totals[1])
        if totals[2] < reducer.world and self.store:
            self._drop_terms()
        seen_weights = totals[3 : 3 + len(names)]
        seen_biases = totals[3 + len(names) : 3 + len(names) + len(bias_names)]
        for name, count, trace in zip(names, seen_weights, totals[3 + len(seen) :]):
            if count > 0:
                state = self.weights.setdefault(name, _WeightState(init.get(name)))
                state.trace_sum = torch.tensor(trace, dtype=like.dtype)
        # every bucket lists the weights in the parameters' order, the same on every rank
        self.weights = {n: self.weights[n] for n in self.params if n in self.weights}
        blocks = [self.biases.get(n, zero_block(self.params[n])[0]) for n in bias_names]
        summed = reducer.all_reduce(blocks)
        self.biases = {n: b for n, b, c in zip(bias_names, summed, seen_biases) if c > 0}
        running = {n: s.running for n, s in self.weights.items() if s.running is not None}
        if running:
            combined = combine_blocks(running, {n: self.params[n] for n in running}, reducer)
            for name, (block, num) in combined.items():
                self.weights[name].running = BlockAccumulator("running")
                self.weights[name].running.update(block, num, 1.0)
        started = [n for n, s in self.weights.items() if s.running is None]
        sums = reducer.all_reduce([self.weights[n].take(self._zeros(n, True)) for n in started])
        for name, value in zip(started, sums):
            self.weights[name].add(value)
            self.weights[name].left = self.weights[name].left.to(value)

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
        """Set the start: direction ``left`` (unit norm), ``right`` scaled to match.

        In the units of the (rescaled, see :meth:`_rescale`) terms.
        """
        out_exp, in_exp = state.exponents
        if state.running is not None:
            left, right = state.running.factors()
            state.left, norm = normalized(left * 2.0 ** (2 * out_exp))
            state.right = right * (2.0 ** (2 * in_exp) * norm)
        else:
            state.right = state.take() * 2.0 ** (2 * (out_exp + in_exp))

    def _rescale(self, state: _WeightState) -> None:
        """Iterate on terms near unit scale where the block is far from it (float32).

        The exponents come from the start, identical on every rank: with a running
        start ``L ⊗ R`` (K-FAC's split) the output side is scaled by
        ``2^{-log₂ max|L| / 2}`` and the input side by ``2^{-log₂ max|R| / 2}``; with a
        given left factor, both sides share the scale of the first right half-step.
        Inside ``2^{±RESCALE_WINDOW}`` nothing changes; otherwise stored terms are
        replaced by scaled copies, streamed ones are scaled as they are visited, and
        :meth:`_result` scales the factors back. Called before :meth:`_start`.
        """
        if state.running is not None:
            left, right = state.running.factors()
            peaks = torch.stack([left.abs().amax(), right.abs().amax()]).double().tolist()
        elif state.acc is not None:
            peak = state.acc.abs().amax().double().item()
            peaks = [math.sqrt(peak), math.sqrt(peak)]
        else:
            return
        if not all(0 < v < math.inf for v in peaks):
            return
        out_exp, in_exp = (-round(math.log2(v) / 2) for v in peaks)
        if max(abs(out_exp), abs(in_exp)) <= RESCALE_WINDOW:
            return
        state.exponents = (out_exp, in_exp)
        state.terms = [terms.scaled(out_exp, in_exp) for terms in state.terms]
        if state.prior is not None:
            prior = state.prior
            state.prior = KroneckerTerm(
                prior.left * 2.0 ** (2 * out_exp), prior.right * 2.0 ** (2 * in_exp)
            )

    def _what(self, name: str) -> str:
        """Name the weight ``name`` (with its shape) for error messages."""
        return f"K-FOC optimal aggregation of '{name}' {tuple(self.params[name].shape)}"

    def _solve_stored(self, name: str, state: _WeightState) -> None:
        terms, scales = list(state.terms), list(state.scales)
        if state.prior is not None:
            terms.append(state.prior)
            scales.append(1.0)
        options = SolverOptions(tol=self.options.tol, max_iter=self.options.max_passes)
        with named_failures(self._what(name)):
            result = nearest_kronecker_terms(terms, scales, options=options, init=state.left)
        state.left, state.right = result.left, result.right
        state.converged, state.iterations = result.converged, result.iterations
        state.terms.clear()

    def _sweep_stored(self, contribute: Callable[[str, object, float], None]) -> None:
        for name, state in self.weights.items():
            for terms, scale in zip(state.terms, state.scales):
                contribute(name, terms, scale)

    def _sweep_data(self, contribute: Callable[[str, object, float], None]) -> None:
        def visit(num: int, loss: Tensor, quantities: dict) -> None:
            for name, state in self.weights.items():
                if name in quantities:
                    terms = quantities[name].terms
                    if state.exponents != (0, 0):
                        terms = terms.scaled(*state.exponents)
                    contribute(name, terms, self._scale(num))

        self._pass(visit)

    def _half_step(self, sweep, active: dict[str, _WeightState], right: bool) -> list[Tensor]:
        """Sum ``Σ X_kᵀ L X_k`` (``right``) or ``Σ X_k R X_kᵀ`` of the active weights over ranks."""

        def contribute(name: str, terms, scale: float) -> None:
            state = active.get(name)
            if state is not None:
                step = terms.to_right(state.left) if right else terms.to_left(state.right)
                state.add(step * scale)

        with self.reducer.guard(f"pass {self.passes + 1} over the data"):
            sweep(contribute)
        sums = [state.take(self._zeros(name, right)) for name, state in active.items()]
        sums = self.reducer.all_reduce(sums)
        for state, value in zip(active.values(), sums):
            if state.prior is not None:
                prior = state.prior
                value = value + (
                    prior.to_right(state.left) if right else prior.to_left(state.right)
                )
            state.add(value)
        return sums

    def _iterate(self) -> None:
        """Power iterations over the data (streaming) or over the stored terms."""
        stream = not self.store
        sweep = self._sweep_data if stream else self._sweep_stored
        cap = self.options.max_passes
        active = dict(self.weights)
        steps = 0
        while active and (self.passes < cap if stream else steps < cap):
            self._half_step(sweep, active, right=True)
            for state in active.values():
                state.right = state.take()  # optimal scale for the direction ``left``
            if stream and self.passes >= cap:
                break
            for state in active.values():
                state.right = normalized(state.right)[0]
            self._half_step(sweep, active, right=False)
            steps += 1
            for state in active.values():
                new_left, norm = normalized(state.take())
                delta = torch.linalg.matrix_norm(new_left - state.left)
                state.left, state.right = new_left, state.right * norm
                state.iterations += 1
                state.converged = bool(delta < self.options.tol)
            active = {n: s for n, s in active.items() if not s.converged}

    def solve(self, init: dict[str, Tensor], prior: dict) -> OptimalFactors:
        """Run the first pass, combine the ranks, iterate; see :func:`solve_optimal`."""
        self.reducer.check_same_params(self.params, "optimal aggregation")
        with self.reducer.guard("the first pass over the data"):
            self._pass(self._first_visit(init))
        self._combine(init)
        if self.num_samples == 0:
            where = "no rank's loader" if self.reducer.active else "the loader"
            raise ValueError(f"optimal_factors: {where} yielded no batches.")
        num_prior = self._add_prior(prior)
        for state in self.weights.values():
            self._rescale(state)
            self._start(state)
        if self.store and not self.reducer.active:
            for name, state in self.weights.items():
                self._solve_stored(name, state)
        else:
            sampler = getattr(self.loader, "sampler", None)
            if not self.store and self.stochastic and isinstance(sampler, RandomSampler):
                warnings.warn(
                    "optimal_factors streams a shuffling loader with the Monte-Carlo Fisher: "
                    "each pass then pairs the per-batch label seeds with other inputs and the "
                    "power method targets a moving Fisher. Use a loader without shuffling.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            self._iterate()
        return self._result(num_prior)

    def _result(self, num_prior: int) -> OptimalFactors:
        factors: dict[str, list[Tensor]] = {}
        total_inputs = self.num_samples + num_prior
        divisor = self.num_samples if self.reduction == "mean" else 1
        for name in self.params:
            if name in self.weights:
                state = self.weights[name]
                out_exp, in_exp = state.exponents
                trace = torch.as_tensor(state.trace_sum).to(state.left) / total_inputs
                trace = trace * 2.0 ** (2 * in_exp)
                left, right = finalize(state.left, state.right, state.left.dtype, right_trace=trace)
                if state.exponents != (0, 0):
                    scaled = KroneckerFactors(left, right, state.iterations, state.converged)
                    left, right = left * 2.0 ** (-2 * out_exp), right * 2.0 ** (-2 * in_exp)
                    with named_failures(self._what(name)):
                        check_representable(scaled, left, right)
                factors[name] = [left / divisor, right]
            elif name in self.biases:
                factors[name] = [self.biases[name] / divisor]
        unsettled = [
            f"'{name}' {tuple(self.params[name].shape)}"
            for name, state in self.weights.items()
            if not state.converged
        ]
        converged = not unsettled
        iterations = max((s.iterations for s in self.weights.values()), default=0)
        if not converged:
            warnings.warn(
                f"K-FOC optimal aggregation stopped (max_passes={self.options.max_passes}) "
                f"before reaching tol={self.options.tol:g} for {len(unsettled)} of "
                f"{len(self.weights)} weights: {', '.join(unsettled)}; their factors "
                "are the last iterate. Increase max_passes or store the terms in memory.",
                RuntimeWarning,
                stacklevel=3,
            )
        loss = torch.as_tensor(self.loss)
        communication = dataclasses.replace(self.reducer.log)
        return OptimalFactors(
            factors,
            loss,
            self.num_samples,
            self.passes,
            iterations,
            converged,
            self.store,
            communication,
        )
