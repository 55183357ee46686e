r"""The data-set optimum: the power method for ``F = Σ_p s_p F_p (+ earlier)`` over a data pass.

K-FOC's ``aggregation="optimal"`` (docs/conventions.md §4, §8). The first pass collects
each batch's per-sample terms, exact bias blocks and loss, and the warm start: the
running aggregate of the per-batch optima (or a given start). Then, per weight, the
power method runs over the terms kept in memory when they fit, else over the data (two
passes per iteration). Across ranks, each half-step's factor-sized partial sums of all
weights are summed in one collective and the stopping test reads the summed values, so
every rank follows the same branch. Index conventions: :mod:`kfoc_backpack.dataset.options`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.data import RandomSampler

from kfoc_backpack.blocks import (
    BlockSum,
    DiagonalKroneckerBlock,
    GroupedKroneckerBlock,
    KroneckerBlock,
)
from kfoc_backpack.collect.batch import BatchQuantities
from kfoc_backpack.collect.layer_terms import LayerTerms, named_failures
from kfoc_backpack.dataset.approximation import Fitted
from kfoc_backpack.dataset.data_pass import DataPass
from kfoc_backpack.dataset.optimal_state import KroneckerTerm, WeightState, normalized
from kfoc_backpack.dataset.options import OptimalOptions
from kfoc_backpack.enums import Aggregation, Grouped, Reduction
from kfoc_backpack.solver import KroneckerFactors, SolverOptions, nearest_kronecker_terms
from kfoc_backpack.solver.rescale import check_representable
from kfoc_backpack.solver.scale import finalize

RESCALE_WINDOW = 10
"""``|exponent|`` up to which the data-set optimum iterates the terms unscaled."""


class OptimalSolver:
    """The power method for the data-set optimum over one :class:`DataPass`.

    Args:
        data: The fit's passes (this rank's shard under ``torch.distributed``).
        options: Tolerance, pass cap and memory policy.
        init: Optional warm start ``[M, M]`` of the left factor per weight name.
    """

    def __init__(
        self,
        data: DataPass,
        options: OptimalOptions,
        init: dict[str, Tensor],
        grouped: Grouped = Grouped.COUPLED,
    ):
        self.data, self.options, self.init, self.grouped = data, options, init, grouped
        self.zeros = {
            name: zero.with_structure(grouped) for name, zero in data.zero_blocks().items()
        }
        """The parameters' zero blocks (a grouped weight's coupled, or refused by :meth:`solve`)."""
        self.store = options.store_terms is not False
        self.batch_options = SolverOptions(tol=options.tol)
        self.weights: dict[str, WeightState] = {}
        self.exact: dict[str, BlockSum] = {}
        self.stored_bytes = 0
        self.loss: Tensor | float = 0.0
        self.num_samples = 0

    def _what(self, name: str) -> str:
        """Name the weight ``name`` (with its shape) for error messages."""
        return f"K-FOC optimal aggregation of '{name}' {tuple(self.data.params[name].shape)}"

    # -- the first pass ------------------------------------------------------------------

    def _state(self, name: str) -> WeightState:
        state = self.weights.get(name)
        if state is None:
            zero: KroneckerBlock = self.zeros[name]  # type: ignore[assignment]
            state = self.weights[name] = WeightState(zero, self.init.get(name))
        return state

    def _weight_names(self) -> list[str]:
        """Return the parameters with Kronecker factors: the ones the power method iterates."""
        zeros = self.zeros
        return [name for name, zero in zeros.items() if isinstance(zero, KroneckerBlock)]

    def _exact_sum(self, name: str) -> BlockSum:
        total = self.exact.get(name)
        if total is None:
            total = self.exact[name] = self.zeros[name].new_sum(Aggregation.APPROX)
        return total

    def _first_visit(self, batch: BatchQuantities, scale: float) -> None:
        num = batch.num_samples
        for name, bias in batch.dense.items():
            self._exact_sum(name).add(bias.exact, num, scale)
        for name, layer in batch.weights.items():
            value = layer.with_structure(Grouped.COUPLED)
            state = self._state(name)
            state.trace_sum = state.trace_sum + num * value.input_trace
            if state.running is not None:
                optimum = value.kfoc_block(self.batch_options, what=self._what(name))
                state.running.add(optimum, num, scale)
            else:
                state.left = state.left.to(value.input_trace)
                state.add(value.terms.to_right(state.left) * scale)
            self._keep(state, value, scale)

    def _keep(self, state: WeightState, value: LayerTerms, scale: float) -> None:
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

    def _combine(self) -> None:
        """Sum the first pass's results over the ranks (no-op in one process)."""
        data = self.data
        if not data.distributed:
            return
        names = self._weight_names()
        seen = [float(n in self.weights) for n in names]
        traces = [self.weights[n].trace_sum if n in self.weights else 0.0 for n in names]
        totals = data.reducer.sum_scalars([self.loss, self.num_samples, self.store, *seen, *traces])
        like = next(iter(data.params.values()))
        self.loss, self.num_samples = torch.tensor(totals[0], dtype=like.dtype), int(totals[1])
        if totals[2] < data.reducer.world and self.store:
            self._drop_terms()
        for name, count, trace in zip(names, totals[3 : 3 + len(names)], totals[3 + len(names) :]):
            if count > 0:
                self._state(name).trace_sum = torch.tensor(trace, dtype=like.dtype)
        # every collective lists the parameters in their order, the same on every rank
        self.weights = {n: self.weights[n] for n in data.params if n in self.weights}
        sums: dict[str, BlockSum] = {}
        for name in self.zeros:
            state = self.weights.get(name)
            if state is None and name not in names:
                sums[name] = self._exact_sum(name)
            elif state is not None and state.running is not None:
                sums[name] = state.running
        combined = data.combine(sums)
        for name in sums:
            fresh = self.zeros[name].new_sum(
                Aggregation.RUNNING if name in self.weights else Aggregation.APPROX
            )
            if name in combined:
                block, num = combined[name]
                fresh.add(block, num, 1.0)
            if name in self.weights:
                self.weights[name].running = fresh  # type: ignore[assignment]
            else:
                self.exact[name] = fresh
        started = [n for n, s in self.weights.items() if s.running is None]
        partial = [self.weights[n].take(self.weights[n].zeros(True)) for n in started]
        for name, value in zip(started, data.sum_over_ranks(partial)):
            self.weights[name].add(value)
            self.weights[name].left = self.weights[name].left.to(value)

    def _add_prior(self, earlier: Fitted | None) -> int:
        """Add an earlier fit's blocks (online): weights as one more term, the rest summed."""
        if earlier is None:
            return 0
        for name, block in earlier.blocks.items():
            state = self.weights.get(name)
            if state is not None:
                state.prior = KroneckerTerm(block.left, block.right)  # type: ignore[attr-defined]
                trace = block.right.diagonal().sum()  # type: ignore[attr-defined]
                state.trace_sum = state.trace_sum + earlier.num_samples * trace
                if state.running is not None:
                    state.running.add(block, earlier.num_samples, 1.0)
                else:
                    state.add(state.prior.to_right(state.left))
            elif name not in self._weight_names():
                self._exact_sum(name).add(block, earlier.num_samples, 1.0)
        return earlier.num_samples

    # -- the iterations ------------------------------------------------------------------

    def _rescale(self, state: WeightState) -> None:
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
            start = state.start()
            peaks = torch.stack([start.left.abs().amax(), start.right.abs().amax()])
            peaks = peaks.double().tolist()
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

    def _start(self, state: WeightState) -> None:
        """Set the start: direction ``left`` (unit norm), ``right`` scaled to match.

        In the units of the (rescaled, see :meth:`_rescale`) terms.
        """
        out_exp, in_exp = state.exponents
        if state.running is not None:
            start = state.start()
            state.left, norm = normalized(start.left * 2.0 ** (2 * out_exp))
            state.right = start.right * (2.0 ** (2 * in_exp) * norm)
        else:
            state.right = state.take() * 2.0 ** (2 * (out_exp + in_exp))

    def _solve_stored(self, name: str, state: WeightState) -> None:
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
        with self.data.guard(f"pass {self.data.passes + 1} over the data"):
            for name, state in self.weights.items():
                for terms, scale in zip(state.terms, state.scales):
                    contribute(name, terms, scale)

    def _sweep_data(self, contribute: Callable[[str, object, float], None]) -> None:
        def visit(batch: BatchQuantities, scale: float) -> None:
            for name, state in self.weights.items():
                if name in batch.weights:
                    terms = batch.weights[name].with_structure(Grouped.COUPLED).terms
                    if state.exponents != (0, 0):
                        terms = terms.scaled(*state.exponents)
                    contribute(name, terms, scale)

        self.data.run(visit, f"[K-FOC optimal: pass {self.data.passes + 1}]")

    def _half_step(self, sweep, active: dict[str, WeightState], right: bool) -> None:
        """Sum ``Σ X_kᵀ L X_k`` (``right``) or ``Σ X_k R X_kᵀ`` of the active weights over ranks."""

        def contribute(name: str, terms, scale: float) -> None:
            state = active.get(name)
            if state is not None:
                step = terms.to_right(state.left) if right else terms.to_left(state.right)
                state.add(step * scale)

        sweep(contribute)  # a failure on any rank raises on every rank at the sweep's end
        zeros = self.data.distributed
        sums = [state.take(state.zeros(right) if zeros else None) for state in active.values()]
        for state, value in zip(active.values(), self.data.sum_over_ranks(sums)):
            if state.prior is not None:
                prior = state.prior
                value = value + (
                    prior.to_right(state.left) if right else prior.to_left(state.right)
                )
            state.add(value)

    def _iterate(self) -> None:
        """Power iterations over the data (streaming) or over the stored terms."""
        stream = not self.store
        sweep = self._sweep_data if stream else self._sweep_stored
        cap = self.options.max_passes
        active = dict(self.weights)
        steps = 0
        while active and (self.data.passes < cap if stream else steps < cap):
            self._half_step(sweep, active, right=True)
            for state in active.values():
                state.right = state.take()  # optimal scale for the direction ``left``
            if stream and self.data.passes >= cap:
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

    # -- the whole solve -----------------------------------------------------------------

    def solve(self, earlier: Fitted | None = None) -> Fitted:
        """Run the first pass, combine the ranks, iterate; the data set's optimal blocks.

        Args:
            earlier: Blocks of earlier data (online; only with a summed loss), added to
                the target once.

        Raises:
            ValueError: For an empty loader (on every rank) or ``earlier`` with a mean
                reduction, or a table with a diagonal row side.
        """
        data = self.data
        if earlier is not None and data.reduction is not Reduction.SUM:
            raise ValueError("prior is only supported with reduction='sum'.")
        tables = [n for n, z in self.zeros.items() if isinstance(z, DiagonalKroneckerBlock)]
        if tables:
            raise ValueError(
                f"aggregation='optimal' is not supported for {', '.join(map(repr, tables))}: "
                "a table of that many rows has a diagonal row side (diag(l) ⊗ R), which only "
                "the per-batch aggregations 'running' and 'approx' give. Use one of them."
            )
        grouped = [n for n, z in self.zeros.items() if isinstance(z, GroupedKroneckerBlock)]
        if grouped:
            raise ValueError(
                f"aggregation='optimal' is not supported for {', '.join(map(repr, grouped))} "
                f"with grouped={self.grouped.value!r}: the data set's optimum is the coupled "
                "product of a grouped convolution (one L ⊗ R over all rows); pass "
                "grouped='coupled', or use 'running' or 'approx' for one product per group."
            )
        # this rank's loss and inputs until _combine sums them over the ranks
        self.loss, self.num_samples = data.run(
            self._first_visit, f"[K-FOC optimal: pass {data.passes + 1}]"
        )
        self._combine()
        if self.num_samples == 0:
            where = "no rank's loader" if data.distributed else "the loader"
            raise ValueError(f"optimal_factors: {where} yielded no batches.")
        num_prior = self._add_prior(earlier)
        for state in self.weights.values():
            self._rescale(state)
            self._start(state)
        if self.store and not data.distributed:
            for name, state in self.weights.items():
                self._solve_stored(name, state)
        else:
            sampler = getattr(data.loader, "sampler", None)
            if not self.store and data.curvature.stochastic and isinstance(sampler, RandomSampler):
                warnings.warn(
                    "optimal_factors streams a shuffling loader with the Monte-Carlo Fisher: "
                    "each pass then pairs the per-batch label seeds with other inputs and the "
                    "power method targets a moving Fisher. Use a loader without shuffling.",
                    RuntimeWarning,
                    stacklevel=4,
                )
            self._iterate()
        return self._result(num_prior)

    def _result(self, num_prior: int) -> Fitted:
        data = self.data
        total_inputs = self.num_samples + num_prior
        divisor = self.num_samples if data.reduction is Reduction.MEAN else 1
        blocks = {}
        for name, zero in self.zeros.items():
            state = self.weights.get(name)
            if state is not None:
                blocks[name] = self._factors(name, state, total_inputs, divisor)
            elif name in self.exact and not self.exact[name].empty:
                blocks[name] = self.exact[name].result().scaled(1.0 / divisor)
            else:
                blocks[name] = zero
        unsettled = [
            f"'{name}' {tuple(data.params[name].shape)}"
            for name, state in self.weights.items()
            if not state.converged
        ]
        if unsettled:
            warnings.warn(
                f"K-FOC optimal aggregation stopped (max_passes={self.options.max_passes}) "
                f"before reaching tol={self.options.tol:g} for {len(unsettled)} of "
                f"{len(self.weights)} weights: {', '.join(unsettled)}; their factors "
                "are the last iterate. Increase max_passes or store the terms in memory.",
                RuntimeWarning,
                stacklevel=4,
            )
        iterations = max((s.iterations for s in self.weights.values()), default=0)
        loss = torch.as_tensor(self.loss)
        return Fitted(
            loss, blocks, self.num_samples, data.passes, iterations, not unsettled, self.store
        )

    def _factors(
        self, name: str, state: WeightState, total_inputs: int, divisor: int
    ) -> KroneckerBlock:
        """Return a weight's optimum in K-FAC's split, scaled back from its iteration units."""
        out_exp, in_exp = state.exponents
        trace = torch.as_tensor(state.trace_sum).to(state.left) / total_inputs
        trace = trace * 2.0 ** (2 * in_exp)
        left, right = finalize(state.left, state.right, state.left.dtype, right_trace=trace)
        if state.exponents != (0, 0):
            scaled = KroneckerFactors(left, right, state.iterations, state.converged)
            left, right = left * 2.0 ** (-2 * out_exp), right * 2.0 ** (-2 * in_exp)
            with named_failures(self._what(name)):
                check_representable(scaled, left, right)
        return KroneckerBlock(left / divisor, right)
