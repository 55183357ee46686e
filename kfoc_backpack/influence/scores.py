r"""Influence scores ``g_testᵀ (B + λI)⁻¹ g_train`` from any curvature of the package.

:class:`Influence` ties a model, its training loss and a
:class:`~kfoc_backpack.influence.Preconditioner` together:

* :meth:`Influence.preconditioned_gradients` — the test inputs' measurement gradients
  times ``(B + λ)⁻¹``, per parameter (one pass over the test data);
* :meth:`Influence.pairwise` — ``[N_test, N_train]`` scores: the preconditioned test
  gradients against every training input's loss gradient (one more pass, over the
  training data; the training gradients are never preconditioned nor stored);
* :meth:`Influence.self_influence` — ``g_nᵀ (B + λ)⁻¹ g_n`` of each training input.

Per-sample gradients come from one backward pass per batch
(:mod:`kfoc_backpack.influence.measure`), a block of inputs at a time so that one
parameter's gradients of a block hold at most :data:`CHUNK_ELEMENTS` numbers. A score
is positive where the training input's loss gradient points along the test
measurement's: a gradient step on the training input would *decrease* the
measurement by about ``η ×`` the score (first order) — for ``measurement="loss"`` a
positive score is a helpful training input. The linear datamodeling score of
``integration/influence.py`` uses this sign.

Index conventions: ``N`` inputs of a batch, ``P`` a parameter's entries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn import Module

from kfoc_backpack.blocks import Block
from kfoc_backpack.collect.hooks import TermCollector
from kfoc_backpack.collect.jacobians import chunks
from kfoc_backpack.collect.loss import output_vectors
from kfoc_backpack.dataset.data_pass import DataPass
from kfoc_backpack.enums import Curvature, Damping, Measurement
from kfoc_backpack.influence.measure import gradients, summed
from kfoc_backpack.influence.preconditioner import (
    DENSE_LIMIT,
    Preconditioner,
    concatenate,
    params_of,
    typed,
)

CHUNK_ELEMENTS = 1 << 24
"""Numbers of one parameter's per-sample gradients held at once (64 MB in float32)."""

Split = Callable[[object], tuple[Any, Tensor]]
"""``split(batch) -> (X, y)`` for loaders whose batches are not ``(X, y)`` pairs."""


class Influence:
    """Influence scores of one model under one curvature (see the module docstring).

    ::

        la = Laplace(model, "classification", hessian_structure="ekfoc")
        la.fit(train_loader)
        influence = Influence.from_laplace(la, measurement="margin")
        scores = influence.pairwise(train_loader, test_loader)   # [N_test, N_train]

    Args:
        model: The trained model (its trainable parameters are scored).
        lossfunc: The training loss (``MSELoss``, ``CrossEntropyLoss`` or
            ``BCEWithLogitsLoss``; each input's own loss is differentiated).
        preconditioner: ``(B + λ)⁻¹`` over every trainable parameter.
        measurement: What is measured on a test input
            (:class:`~kfoc_backpack.enums.Measurement`); training inputs always
            contribute their loss gradient.
        split: ``batch -> (X, y)`` for loaders of other batches (default: pairs).
        progress_bar: Show a tqdm progress bar per pass.

    Raises:
        ValueError: For a preconditioner that misses a trainable parameter.
        NotImplementedError: For a model the hook route does not cover.
    """

    def __init__(
        self,
        model: Module,
        lossfunc: Module,
        preconditioner: Preconditioner,
        *,
        measurement: Measurement | str = Measurement.LOSS,
        split: Split | None = None,
        progress_bar: bool = False,
    ):
        self.model, self.lossfunc = model, lossfunc
        self.preconditioner = preconditioner
        self.measurement = Measurement.parse(measurement, "measurement")
        self.split, self.progress_bar = split, progress_bar
        self.collector = TermCollector(model, lossfunc, owner="influence")
        self.params = params_of(model)
        preconditioner.check_covers(self.params)

    @classmethod
    def from_laplace(
        cls,
        la: Any,
        damping: float = 0.1,
        rule: Damping | str = Damping.MEAN_EIGENVALUE,
        **kwargs: Any,
    ) -> Influence:
        """Scores under a fitted all-weights Laplace approximation's curvature.

        The curvature per input (:meth:`Preconditioner.from_laplace`), the loss of its
        likelihood as its backend takes it (``la.backend.lossfunc``: cross-entropy, or
        squared error for regression), each input's own.

        Args:
            la: A fitted Laplace approximation (``kfoc``, ``ekfoc``, ``ekfac``, ``kfac``
                of this package, or laplace-torch's ``kron``).
            damping: As :meth:`Preconditioner.from_blocks`.
            rule: :class:`~kfoc_backpack.enums.Damping`.
            **kwargs: :class:`Influence`'s keyword arguments.
        """
        preconditioner = Preconditioner.from_laplace(la, damping, rule)
        return cls(la.model, la.backend.lossfunc, preconditioner, **kwargs)

    @classmethod
    def from_factors(
        cls,
        model: Module,
        lossfunc: Module,
        factors: Mapping[str, Block | Sequence[Tensor]],
        damping: float = 0.1,
        rule: Damping | str = Damping.MEAN_EIGENVALUE,
        scale: float = 1.0,
        **kwargs: Any,
    ) -> Influence:
        """Scores under per-parameter blocks or factors, e.g. BackPACK's.

        ::

            with backpack(KFOC()):
                lossfunc(model(X), y).backward()
            factors = {name: p.kfoc for name, p in model.named_parameters()}
            influence = Influence.from_factors(model, lossfunc, factors)

        Args:
            model: The model.
            lossfunc: The training loss.
            factors: Per trainable parameter, its block or its factors as BackPACK's
                ``savefield`` holds them (``[L, R]`` of a weight, ``[B]`` of a bias).
            damping: As :meth:`Preconditioner.from_blocks`.
            rule: :class:`~kfoc_backpack.enums.Damping`.
            scale: Multiplies every block (e.g. ``1/N`` for factors of a summed loss).
            **kwargs: :class:`Influence`'s keyword arguments.

        Raises:
            ValueError: For factors of other shapes than the parameter's structure.
        """
        templates = TermCollector(model, lossfunc, owner="influence").zero_blocks()
        blocks = typed(factors, templates)
        preconditioner = Preconditioner.from_blocks(blocks, damping, rule, scale)
        return cls(model, lossfunc, preconditioner, **kwargs)

    @classmethod
    def exact(
        cls,
        model: Module,
        lossfunc: Module,
        loader: Iterable,
        curvature: Curvature | str = Curvature.GGN,
        damping: float = 0.1,
        rule: Damping | str = Damping.MEAN_EIGENVALUE,
        **kwargs: Any,
    ) -> Influence:
        """Scores under the exact dense curvature of a small model (:func:`exact_curvature`).

        Raises:
            ValueError: For a model with more than
                :data:`~kfoc_backpack.influence.preconditioner.DENSE_LIMIT` parameters.
        """
        names, sizes, matrix = exact_curvature(
            model, lossfunc, loader, curvature, split=kwargs.get("split")
        )
        preconditioner = Preconditioner.dense(names, sizes, matrix, damping, rule)
        return cls(model, lossfunc, preconditioner, **kwargs)

    # ----------------------------------------------------------------------------------

    def _pass(self, loader: Iterable) -> DataPass:
        return DataPass(
            self.collector,
            loader,
            self.params,
            split=self.split,
            progress_bar=self.progress_bar,
            owner="influence",
        )

    def _gradients(self, X: Any, y: Tensor, measurement: Measurement) -> tuple[dict, int]:
        found = gradients(self.collector, X, y, measurement)
        self.preconditioner.check_covers(found)
        num = next(iter(found.values())).num_inputs if found else 0
        return found, num

    def gradients(
        self, loader: Iterable, measurement: Measurement | str | None = None
    ) -> dict[str, Tensor]:
        """Per trainable parameter, ``[N, P]``: every input's gradient, stored.

        For studies that score one set of gradients under many curvatures
        (:meth:`Preconditioner.scores`); :meth:`pairwise` streams the training set instead.

        Args:
            loader: The inputs and their targets.
            measurement: :class:`~kfoc_backpack.enums.Measurement` (default: the loss).
        """
        measurement = Measurement.parse(measurement or Measurement.LOSS, "measurement")
        parts: dict[str, list[Tensor]] = {name: [] for name in self.params}

        def visit(X: Any, y: Tensor) -> None:
            found, num = self._gradients(X, y, measurement)
            for name in parts:
                if name in found:
                    parts[name].append(found[name].rows()[0].reshape(num, -1))
                else:
                    parts[name].append(self.params[name].new_zeros(num, self.params[name].numel()))

        self._pass(loader).each(visit, "[influence: gradients]")
        return {name: torch.cat(values) for name, values in parts.items() if values}

    def preconditioned_gradients(self, loader: Iterable) -> dict[str, Tensor]:
        """Per trainable parameter, ``[N, P]``: the test gradients times ``(B + λ)⁻¹``.

        Args:
            loader: The test inputs and their targets.
        """
        parts: dict[str, list[Tensor]] = {name: [] for name in self.preconditioner.names}

        def visit(X: Any, y: Tensor) -> None:
            found, num = self._gradients(X, y, self.measurement)
            with torch.no_grad():
                for group in self.preconditioner.groups:
                    rows = group.rows(found, num)
                    for name, part in group.split(group.precondition(rows)).items():
                        parts[name].append(part)

        self._pass(loader).each(visit, "[influence: test gradients]")
        return {name: torch.cat(values) for name, values in parts.items() if values}

    def pairwise(self, train_loader: Iterable, test_loader: Iterable) -> Tensor:
        """``[N_test, N_train]``: ``g_testᵀ (B + λ)⁻¹ g_train`` of every pair.

        One pass over the test data (:meth:`preconditioned_gradients`, held in memory:
        ``N_test × parameters`` numbers), one over the training data.
        """
        queries = self.preconditioned_gradients(test_loader)
        if not queries:
            raise ValueError("influence: the test loader gave no inputs.")
        num_test = next(iter(queries.values())).shape[0]
        columns: list[Tensor] = []

        def visit(X: Any, y: Tensor) -> None:
            found, num = self._gradients(X, y, Measurement.LOSS)
            scores = next(iter(queries.values())).new_zeros(num_test, num)
            with torch.no_grad():
                for name, jacobian in found.items():
                    query = queries[name]
                    size = max(1, CHUNK_ELEMENTS // max(query.shape[1], 1))
                    for start, part in chunks(jacobian, size):
                        rows = part.rows()[0].reshape(part.num_inputs, -1).to(query.dtype)
                        scores[:, start : start + part.num_inputs] += query @ rows.T
            columns.append(scores)

        self._pass(train_loader).each(visit, "[influence: training gradients]")
        return torch.cat(columns, dim=1)

    def self_influence(self, train_loader: Iterable) -> Tensor:
        """``[N_train]``: ``g_nᵀ (B + λ)⁻¹ g_n`` of each training input's loss gradient."""
        values: list[Tensor] = []

        def visit(X: Any, y: Tensor) -> None:
            found, num = self._gradients(X, y, Measurement.LOSS)
            with torch.no_grad():
                total = None
                for group in self.preconditioner.groups:
                    share = group.square_form(group.rows(found, num))
                    total = share if total is None else total + share
            values.append(total)

        self._pass(train_loader).each(visit, "[influence: self-influence]")
        return torch.cat(values)


def exact_curvature(
    model: Module,
    lossfunc: Module,
    loader: Iterable,
    curvature: Curvature | str = Curvature.GGN,
    split: Split | None = None,
) -> tuple[list[str], list[int], Tensor]:
    """Return the dense curvature per input over all trainable parameters (cross-layer terms).

    One pass over ``loader``: the mean over its inputs of ``Σ_m r_{m,n} r_{m,n}ᵀ``, ``r``
    the per-sample rows of the target (:class:`~kfoc_backpack.enums.Curvature`: exact
    GGN, Monte-Carlo or empirical Fisher), accumulated in float64.

    Returns:
        The parameters' names and sizes (in ``named_parameters`` order) and the
        ``[P, P]`` matrix in the parameters' dtype.

    Raises:
        ValueError: For a model with more than
            :data:`~kfoc_backpack.influence.preconditioner.DENSE_LIMIT` parameters.
    """
    curvature = Curvature.parse(curvature, "curvature")
    params = params_of(model)
    names = list(params)
    sizes = [params[name].numel() for name in names]
    total = sum(sizes)
    like = params[names[0]].detach()
    if total > DENSE_LIMIT:
        raise ValueError(
            f"influence: the exact dense curvature of {total} parameters does not fit "
            f"(limit {DENSE_LIMIT}); use a Kronecker-factored curvature."
        )
    collector = TermCollector(model, lossfunc, owner="influence")
    matrix = torch.zeros(total, total, dtype=torch.float64, device=like.device)
    count = 0
    loss = summed(lossfunc)

    def visit(X: Any, y: Tensor) -> None:
        nonlocal matrix, count
        shape: list[int] = []

        def vectors(output: Tensor) -> Tensor:
            units = output_vectors(loss, output, y.to(output.device), curvature)
            shape.extend(units.shape[:2])  # [K vectors per input, N inputs]
            return units

        jacobians = collector.output_jacobians(X, vectors).parameters
        flat = concatenate(names, sizes, jacobians, shape[0] * shape[1], matrix)
        matrix += flat.T @ flat
        count += shape[1]

    data = DataPass(collector, loader, params, split=split, curvature=curvature)
    data.each(visit, "[influence: exact curvature]")
    return names, sizes, (matrix / max(count, 1)).to(like.dtype)
