"""``KFOCBackend`` and ``KFOCEFBackend``: laplace-torch curvature backends with K-FOC factors.

``kron()`` returns, per trainable parameter, K-FOC's Frobenius-optimal ``[L_out, R_in]``
for weights and the exact block ``[B]`` for biases, in laplace-torch's ``Kron`` layout
and scaling (the same as its default backend's: the loss is summed over the batch,
the input-side factor is rescaled by ``n/N`` so that factor-wise sums over batches
approximate the data set, and the likelihood ``factor`` is spread over both
factors). The per-sample quantities come from the hook route
(:class:`~kfoc_backpack.collect.hooks.TermCollector`), so every model laplace-torch's
``kron`` fits works: ``nn.Module`` subclasses, residual sums, attention blocks with
frozen attention weights, frozen BatchNorm, dict inputs. The other methods
(``jacobians``, ``gradients``, ``diag``, ``full``) are laplace-torch's own
``torch.func`` implementations.

Only trainable parameters count, so frozen parameters (a last-layer Laplace on a
frozen backbone, a frozen feature extractor) are fine; ``.grad`` is left untouched.

Index conventions: ``n`` inputs of a batch, ``N`` inputs of the data set (laplace-torch's
argument name), ``L_out``/``R_in`` a weight's output-side and input-side factors.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, MutableMapping
from typing import Any

import torch
from laplace.curvature import CurvatureInterface, EFInterface, GGNInterface
from laplace.utils import Kron
from torch import Tensor
from torch.nn import Module, Parameter

from kfoc_backpack._compat import supported_kwargs
from kfoc_backpack.collect.hooks import TermCollector
from kfoc_backpack.collect.registry import covered
from kfoc_backpack.dataset.kfoc import KFOCFactors
from kfoc_backpack.enums import Aggregation, Curvature, Grouped, Stop
from kfoc_backpack.laplace.errors import BatchKeyError
from kfoc_backpack.laplace.posterior import BlockKron
from kfoc_backpack.solver import DEFAULT_MAX_ITER, DEFAULT_STOP, DEFAULT_TOL, SolverOptions


def check_supported_layers(module: Module, owner: str = "KFOCBackend") -> None:
    """Check, before any work, that every layer with trainable parameters has factors.

    Raises:
        NotImplementedError: Naming the first unsupported layer (module path and
            type), what is supported and the ways out.
    """
    covered(module, owner)


def batch_inputs(batch: object, dict_key_x: str, dict_key_y: str, owner: str) -> tuple[Any, Tensor]:
    """Split a batch into model input and targets, as laplace-torch's ``fit`` does.

    ``(X, y)`` pairs, or dict-like batches (Hugging Face style) whose whole mapping is
    the model input and ``batch[dict_key_y]`` the targets.

    Raises:
        BatchKeyError: A ``KeyError`` (as laplace-torch raises) and ``ValueError``,
            for a dict-like batch without ``dict_key_y``.
        ValueError: For another kind of batch.
    """
    if isinstance(batch, MutableMapping):
        if dict_key_y not in batch:
            raise BatchKeyError(
                f"{owner}: dict-like batch without the target key {dict_key_y!r} "
                f"(keys: {list(batch)}); set dict_key_y."
            )
        return batch, batch[dict_key_y]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError(
        f"{owner} needs batches (X, y) or dict-like batches, got {type(batch).__name__}."
    )


def resolve_backend(backend: type | None, owner: str = "KFOCLaplace") -> type[KFOCKronMixin]:
    """Return the backend class a Laplace class of this package uses for ``backend``.

    ``None`` gives :class:`KFOCBackend`; subclasses of :class:`KFOCBackend` or
    :class:`KFOCEFBackend` are used as they are. Another GGN backend (e.g. ``AsdlGGN``,
    which ``marglik_training`` passes on) is replaced by ``KFOCBackend``, an
    empirical-Fisher backend (``CurvlinopsEF``, ``AsdlEF``, ``BackPackEF``) by
    ``KFOCEFBackend``, with a warning naming the replacement: the curvature comes
    from the package's own collection of per-sample quantities.

    Raises:
        ValueError: For something that is not a laplace-torch curvature class.
    """
    if backend is None:
        return KFOCBackend
    if not isinstance(backend, type) or not issubclass(backend, CurvatureInterface):
        raise ValueError(f"backend must be a laplace-torch curvature class, got {backend!r}.")
    if issubclass(backend, KFOCKronMixin):
        return backend
    ours = KFOCEFBackend if issubclass(backend, EFInterface) else KFOCBackend
    warnings.warn(
        f"{owner} computes its curvature with {ours.__name__}; "
        f"backend={backend.__name__} is replaced by {ours.__name__}.",
        UserWarning,
        stacklevel=4,
    )
    return ours


class KFOCKronMixin:
    """K-FOC's collection and ``kron()`` for a laplace-torch curvature interface.

    The host class (a laplace-torch curvature interface) calls :meth:`_init_kfoc`
    from its ``__init__`` with its curvature target.
    """

    curvature: Curvature
    num_samples: int
    solver_options: SolverOptions

    def _init_kfoc(
        self,
        interface: type,
        model: Module,
        likelihood: str,
        kwargs: dict[str, Any],
        curvature: Curvature,
        num_samples: int,
        tol: float,
        max_iter: int,
        stop: Stop | str = DEFAULT_STOP,
    ) -> None:
        """Initialise laplace-torch's ``interface`` and the K-FOC collector."""
        interface.__init__(self, model, likelihood, **supported_kwargs(interface.__init__, kwargs))
        self.last_layer, self.subnetwork_indices = (
            kwargs["last_layer"],
            kwargs["subnetwork_indices"],
        )
        self.dict_key_x, self.dict_key_y = kwargs["dict_key_x"], kwargs["dict_key_y"]
        self.curvature, self.num_samples = curvature, num_samples
        self.solver_options = SolverOptions(tol=tol, max_iter=max_iter, stop=stop)
        self.collector = TermCollector(
            self._model,
            self.lossfunc,
            self.curvature,
            self.num_samples,
            forward=self.model,
            owner=type(self).__name__,
            last_layer_hint=not self.last_layer,
        )

    @property
    def named_trainable(self) -> dict[str, Parameter]:
        """Trainable parameters that get curvature, by name, in laplace's order."""
        return {name: p for name, p in self._model.named_parameters() if p.requires_grad}

    def splitter(
        self, check_batch: Callable[[Any, Tensor], None] | None = None, owner: str = "KFOCLaplace"
    ) -> Callable[[object], tuple[Any, Tensor]]:
        """``batch -> (X, y)`` as every pass of a fit reads the loader's batches.

        ``(X, y)`` pairs or dict-like batches (``dict_key_y`` the targets), moved to the
        parameters' device and checked by ``check_batch``.
        """
        device = next(iter(self.named_trainable.values())).device

        def split(batch: object) -> tuple[Any, Tensor]:
            X, y = batch_inputs(batch, self.dict_key_x, self.dict_key_y, owner)
            X, y = (X.to(device) if isinstance(X, Tensor) else X), y.to(device)
            if check_batch is not None:
                check_batch(X, y)
            return X, y

        return split

    def kron(self, x: Any, y: Tensor, N: int, **kwargs: Any) -> tuple[Tensor, Kron]:
        """K-FOC factors of one batch in laplace-torch's ``Kron`` layout and scaling.

        Per weight the Frobenius-optimal ``L_out ⊗ R_in`` of the batch's block of the
        curvature of the summed loss (K-FAC's split, ``tr(R_in) = (1/n) Σ_i ‖â_i‖²``),
        per bias its exact block; labels drawn from torch's global generator. A grouped
        convolution's factors are coupled over all its rows (``Kron``'s layout, which
        laplace-torch's ``KronLaplace`` adds batch to batch;
        ``hessian_structure="kfoc"`` has the per-group block, ``grouped``).

        Args:
            x: ``[n, *]`` inputs (or a dict-like batch).
            y: Targets.
            N: Number of data points of the whole data set.
            **kwargs: Ignored (laplace-torch passes backend-specific options).

        Returns:
            ``(factor · loss, factor · Kron)``; weights' ``R_in`` carry ``n/N`` like
            laplace-torch's default backend, so that factor-wise sums over the batches
            give K-FOC_approx of the data set.
        """
        batch = self.collector(x, y)
        approximation = KFOCFactors(Aggregation.APPROX, grouped=Grouped.COUPLED)
        approximation.solver_options = self.solver_options
        solve = approximation.weight_block(type(self).__name__, self.named_trainable)
        zeros = self.collector.zero_blocks()
        blocks = []
        for name in self.named_trainable:
            if name in batch.weights:
                block = solve(name, batch.weights[name])
            else:
                terms = batch.dense.get(name)
                zero = approximation.template(zeros[name])
                block = zero if terms is None else approximation.dense_block(terms)
            blocks.append(block.input_scaled(batch.num_samples / N))
        return self.factor * batch.loss, BlockKron(blocks) * self.factor


class KFOCBackend(KFOCKronMixin, GGNInterface):
    """laplace-torch curvature backend whose ``kron()`` returns K-FOC factors of the GGN.

    Use it wherever laplace-torch takes a backend, e.g.
    ``Laplace(model, "classification", hessian_structure="kron",
    backend=KFOCBackend)``, or through ``hessian_structure="kfoc"``
    (:class:`~kfoc_backpack.laplace.KFOCLaplace`), which adds aggregation over
    batches. ``backend_kwargs={"stochastic": True}`` gives the Monte-Carlo Fisher
    (``num_samples`` labels per input, torch's global generator) instead of the
    exact GGN, as for laplace-torch's GGN backends.

    Args:
        model: The model (or laplace-torch's ``FeatureExtractor``).
        likelihood: ``"classification"`` or ``"regression"``.
        last_layer: Curvature of the last layer only.
        subnetwork_indices: Indices into the trainable parameters (``diag``,
            ``jacobians`` and ``gradients`` only).
        dict_key_x: Key of the model input in dict-like batches.
        dict_key_y: Key of the targets in dict-like batches.
        stochastic: Monte-Carlo Fisher (``True``) or exact GGN (default).
        num_samples: Sampled labels per input for the Monte-Carlo Fisher.
        tol: Tolerance of the per-batch K-FOC solves.
        max_iter: Iteration cap of the per-batch K-FOC solves.
        stop: What ``tol`` bounds: the left factor's change (``"factors"``) or the
            captured norm's (``"objective"``), see :class:`~kfoc_backpack.enums.Stop`.

    Raises:
        NotImplementedError: If a layer with trainable parameters has no K-FOC
            factors (see :func:`check_supported_layers`).
    """

    def __init__(
        self,
        model: Module,
        likelihood: str,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        stochastic: bool = False,
        num_samples: int = 1,
        tol: float = DEFAULT_TOL,
        max_iter: int = DEFAULT_MAX_ITER,
        stop: Stop | str = DEFAULT_STOP,
    ):
        if int(num_samples) != num_samples or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}.")
        kwargs = {
            "last_layer": last_layer,
            "subnetwork_indices": subnetwork_indices,
            "dict_key_x": dict_key_x,
            "dict_key_y": dict_key_y,
            "stochastic": stochastic,
            "num_samples": int(num_samples),
        }
        curvature = Curvature.MC if stochastic else Curvature.GGN
        self._init_kfoc(
            GGNInterface,
            model,
            likelihood,
            kwargs,
            curvature,
            int(num_samples),
            tol,
            max_iter,
            stop,
        )


class KFOCEFBackend(KFOCKronMixin, EFInterface):
    """laplace-torch backend whose ``kron()`` returns K-FOC factors of the empirical Fisher.

    ``F = Σ_n vec(G_n) vec(G_n)ᵀ`` per weight, ``G_n`` the gradient of input ``n``'s
    loss at its true label. :class:`~kfoc_backpack.laplace.KFOCLaplace` uses it when
    given one of laplace-torch's empirical-Fisher backends (``CurvlinopsEF``,
    ``AsdlEF``, ``BackPackEF``). Arguments as :class:`KFOCBackend`, without the
    Monte-Carlo ones.
    """

    def __init__(
        self,
        model: Module,
        likelihood: str,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        tol: float = DEFAULT_TOL,
        max_iter: int = DEFAULT_MAX_ITER,
        stop: Stop | str = DEFAULT_STOP,
    ):
        kwargs = {
            "last_layer": last_layer,
            "subnetwork_indices": subnetwork_indices,
            "dict_key_x": dict_key_x,
            "dict_key_y": dict_key_y,
        }
        self._init_kfoc(
            EFInterface, model, likelihood, kwargs, Curvature.EF, 1, tol, max_iter, stop
        )
