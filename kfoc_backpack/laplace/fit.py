"""``KFOCKronFit``: what K-FOC changes in laplace-torch's ``KronLaplace``.

Every Laplace class of this package (K-FOC, eigenvalue-corrected K-FOC, EK-FAC; all
weights or last layer) puts this class in front of laplace-torch's ``KronLaplace`` in
its method resolution order. It overrides:

* ``fit`` — the curvature comes from the class's
  :class:`~kfoc_backpack.laplace.approximation.Approximation` (K-FOC's aggregation over
  batches, its eigenvalue correction, ...; over ``torch.distributed`` ranks too) instead
  of laplace-torch's per-batch ``kron`` sums;
* ``_init_H`` — a zero ``Kron`` for weights of any dimension (``Conv3d``);
* ``posterior_precision`` — keeps ``damping``, which laplace-torch's arithmetic drops;
* ``state_dict``/``load_state_dict`` — carry the aggregation and any corrected
  eigenvalues.

It has no ``__init__``: the concrete classes call laplace-torch's constructors, then
:meth:`KFOCKronFit._set_approximation`.

Index conventions: ``N`` (``n_data``) inputs of the data set (all ranks), ``L_out``/``R_in``
a weight's factors, ``δ`` the damping.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from laplace.baselaplace import KronLaplace
from laplace.utils import Kron, KronDecomposed
from torch import Tensor
from torch.nn.utils import parameters_to_vector
from torch.utils.data import DataLoader

from kfoc_backpack.dataset import Communication, OptimalOptions
from kfoc_backpack.dataset.blocks import zero_block
from kfoc_backpack.dataset.distributed import Reducer
from kfoc_backpack.laplace.aggregate import batch_splitter
from kfoc_backpack.laplace.approximation import (
    Approximation,
    EigenCorrection,
    FitJob,
    Fitted,
)
from kfoc_backpack.laplace.backend import batch_inputs, check_supported_layers
from kfoc_backpack.laplace.errors import UnsupportedDtypeError
from kfoc_backpack.solver.correction import EigenCorrected


def kfoc_zero_kron(params: list[Tensor], device: torch.device, dtype: torch.dtype) -> Kron:
    """Zero ``Kron`` for ``params`` (any weight dimension, e.g. ``Conv3d``)."""
    return Kron([[b.to(device, dtype) for b in zero_block(p)] for p in params])


class KFOCKronFit(KronLaplace):
    """``KronLaplace`` fitted with K-FOC's factors (see the module docstring)."""

    _key = None
    """Not a structure of its own: laplace-torch's ``Laplace`` maps ``_key`` to classes, and
    the inherited ``("all", "kron")`` would compete with ``KronLaplace``."""

    def _set_approximation(
        self,
        approximation: Approximation,
        damping: bool,
        process_group: object | None,
    ) -> None:
        approximation.check_damping(damping, type(self).__name__)
        self.approximation = approximation
        self.process_group = process_group
        self.communication = None
        self.corrected: list[EigenCorrected | None] = []

    @property
    def aggregation(self) -> str:
        """How the per-batch factors are aggregated over the data set."""
        return self.approximation.aggregation

    @property
    def optimal_options(self) -> OptimalOptions:
        """Options of ``aggregation="optimal"`` (defaults where there is none)."""
        return getattr(self.approximation, "options", OptimalOptions())

    @property
    def tol(self) -> float:
        """Power-method tolerance of ``"optimal"``."""
        return self.optimal_options.tol

    @property
    def max_passes(self) -> int:
        """Cap on iterations/passes of ``"optimal"``."""
        return self.optimal_options.max_passes

    def _check_supported(self) -> None:
        """Reject trainable layers without K-FOC factors, before any work."""
        check_supported_layers(self.model, type(self).__name__)

    def _check_dtype(self) -> None:
        """Reject half precisions, which laplace-torch's eigendecomposition cannot take.

        laplace-torch's ``KronDecomposed`` calls ``torch.linalg.eigh``, which has no
        float16/bfloat16 kernels, and on failure ends the process; this raises first,
        an :class:`~kfoc_backpack.laplace.errors.UnsupportedDtypeError` (a ``TypeError``
        and a ``ValueError``, which laplace-torch's callers catch).
        """
        if self._dtype in (torch.float16, torch.bfloat16):
            raise UnsupportedDtypeError(
                f"{type(self).__name__}: the model's parameters are {self._dtype}; "
                "laplace-torch's Kronecker eigendecomposition needs float32 or float64. "
                "Fit on a float32 copy (model.float()) and cast the inputs alike."
            )

    def _init_H(self) -> None:
        self.H = kfoc_zero_kron(self.params, self._device, self._dtype)

    def _check_batch(self, X: Tensor, y: Tensor) -> None:
        if self.likelihood == "regression" and y.ndim != self._out_ndim:
            raise ValueError(
                f"The model's output has {self._out_ndim} dims but the target has {y.ndim} dims."
            )

    def _raw_fitted(self) -> Fitted:
        """Return the fitted curvature without the likelihood factor (online, loading)."""
        factor = float(self.backend.factor)
        blocks = []
        for block in self.H_facs.kfacs:
            scale = factor ** (1 / len(block))
            blocks.append([b / scale for b in block])
        loss = torch.as_tensor(self.loss) / factor
        return Fitted(loss, blocks, self.n_data, Communication(), list(self.corrected))

    def _first_output_shape(self, train_loader: DataLoader) -> tuple[int, int]:
        """Return ``(outputs, ndim)`` of the output on the first batch, ``(0, 0)`` if none."""
        first = next(iter(train_loader), None)
        if first is None:
            return 0, 0
        X0, _ = batch_inputs(first, self.dict_key_x, self.dict_key_y, type(self).__name__)
        with torch.no_grad():
            if not isinstance(X0, Tensor):
                out = self.model(X0)
            else:
                try:
                    out = self.model(X0[:1].to(self._device))
                except (TypeError, AttributeError):
                    out = self.model(X0.to(self._device))
        return out.shape[-1], out.ndim

    def _set_output_shape(self, shape: tuple[int, int], reducer: Reducer) -> None:
        """Set ``n_outputs``; in a distributed fit ranks with an empty shard are told."""
        if reducer.active:  # all ranks with data agree
            outputs, ndim, count = reducer.sum_scalars([*shape, shape[0] > 0])
            shape = (int(outputs / count), int(ndim / count)) if count else (0, 0)
        if shape[0] == 0:
            raise ValueError(f"{type(self).__name__}.fit: the train_loader yielded no batches.")
        self.n_outputs, self._out_ndim = shape
        self.model.output_size = self.n_outputs
        if self.likelihood == "classification" and self.n_outputs == 1:
            raise ValueError(
                f"{type(self).__name__}: likelihood='classification' with a single output "
                "unit: the softmax over one class is 1 for every input, so the likelihood "
                "has no curvature. Give the model one output per class (two for a binary "
                "problem) or use likelihood='regression'."
            )

    def fit(
        self,
        train_loader: DataLoader,
        override: bool = True,
        progress_bar: bool = False,
    ) -> None:
        """Fit the K-FOC Laplace approximation at the current parameters.

        Under ``torch.distributed`` (or with ``process_group``), each rank passes its
        shard of the data; every rank ends with the same factors, loss and ``n_data``
        (the inputs of all shards), see docs/conventions.md §8.

        Args:
            train_loader: Batches ``(X, y)`` or dict-like batches (the whole mapping
                is the model input, ``batch[dict_key_y]`` the targets);
                ``len(train_loader.dataset)`` (or, without a ``dataset``, the number
                of inputs seen; in a distributed fit the inputs of all ranks) is ``N``.
            override: Start afresh (``True``) or add the data to the current fit
                (online learning): the earlier factors enter the aggregation as one
                more Kronecker term (``"running"``/``"optimal"``: optimally merged;
                ``"approx"``: factor-wise sums, as ``KronLaplace`` does).
            progress_bar: Show a tqdm progress bar.

        Raises:
            ValueError: For malformed batches, an empty loader or a one-output
                classifier (before any curvature is computed).
            BatchKeyError: For a dict-like batch without ``dict_key_y`` (a
                ``KeyError`` and a ``ValueError``).
            UnsupportedDtypeError: For a float16/bfloat16 model (a ``TypeError`` and a
                ``ValueError``).
            NotImplementedError: For a trainable layer without K-FOC factors.
            FloatingPointError: For NaN/Inf in the input, the output or a layer.
            DistributedFitError: On every rank, when one rank failed.
        """
        reducer = Reducer(self.process_group)
        with reducer.guard(f"{type(self).__name__}.fit's checks"):
            self._check_supported()
            self._check_dtype()
            shape = self._first_output_shape(train_loader)
        self._set_output_shape(shape, reducer)
        online = not override and self.H_facs is not None
        if not online:
            self.H_facs = None
            self._init_H()
            self.loss, self.n_data = 0, 0
        self.model.eval()
        self.mean = parameters_to_vector(self.params)
        if not self.enable_backprop:
            self.mean = self.mean.detach()
        backend = self.backend
        owner = type(self).__name__
        job = FitJob(
            backend,
            train_loader,
            batch_splitter(backend, self._check_batch, owner),
            self._check_batch,
            reducer,
            progress_bar or getattr(self, "_progress_bar", False),
            owner,
        )
        earlier = self._raw_fitted() if online else None
        fitted = self.approximation.fit(job, earlier)
        self.communication = reducer.log
        self.loss = self.loss + backend.factor * fitted.loss
        dataset = getattr(train_loader, "dataset", None)
        use_len = dataset is not None and not reducer.active
        self.n_data += len(dataset) if use_len else fitted.num_samples
        self._set_fitted(fitted)

    def _set_fitted(self, fitted: Fitted) -> None:
        """``H_facs``, ``H`` and the corrected eigenvalues from raw curvature."""
        fitted.blocks = [[b.to(self._dtype) for b in block] for block in fitted.blocks]
        self.corrected = fitted.corrected
        self.H_facs, self.H = self.approximation.decompose(
            fitted, float(self.backend.factor), self.damping
        )

    @property
    def posterior_precision(self) -> KronDecomposed:
        """Kronecker-factored posterior precision ``H · factor + P₀``, damping kept.

        laplace-torch's ``KronDecomposed`` arithmetic (``*``, ``+``) returns objects
        without ``damping``, so ``KronLaplace(damping=True)`` is undamped in practice;
        here the flag is carried over.
        """
        self._check_H_init()
        self.approximation.check_damping(self.damping, type(self).__name__)
        precision = self.H * self._H_factor + self.prior_precision
        precision.damping = self.damping
        return precision

    @property
    def posterior_covariance(self) -> Tensor:
        """Dense ``[P, P]`` posterior covariance ``(H · factor + P₀)⁻¹`` (small models).

        laplace-torch's ``KronLaplace`` has none; this is the posterior precision's
        decomposition at exponent ``-1``, block-diagonal over the parameters.
        """
        return self.posterior_precision.to_matrix(exponent=-1)

    @property
    def posterior_variance(self) -> Tensor:
        """``[P]`` diagonal of the posterior covariance, without forming it."""
        return self.posterior_precision.diag(exponent=-1)

    def state_dict(self) -> dict[str, Any]:
        """``KronLaplace``'s state dict plus the aggregation and corrected eigenvalues.

        ``"corrected"``: per trainable parameter ``(U_L, U_R, S)`` of an
        eigenvalue-corrected weight (``S`` without the likelihood factor) or ``None``.
        """
        state = super().state_dict()
        state["aggregation"] = self.aggregation
        state["corrected"] = [
            None if c is None else (c.left_basis, c.right_basis, c.diagonal) for c in self.corrected
        ]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by the same class (warns on another aggregation).

        Raises:
            ValueError: For a state of another Laplace class (laplace-torch's check), or
                corrected eigenvalues where the class has none (and the reverse).
        """
        super().load_state_dict(state_dict)
        saved = state_dict.get("aggregation", self.aggregation)
        if saved != self.aggregation:
            warnings.warn(
                f"Loading factors aggregated with {saved!r} into a {type(self).__name__} "
                f"with aggregation={self.aggregation!r}; online fits continue with "
                f"{self.aggregation!r}.",
                UserWarning,
                stacklevel=2,
            )
        self.corrected = [
            None if c is None else EigenCorrected(*c) for c in state_dict.get("corrected", [])
        ]
        if bool(self.corrected) != isinstance(self.approximation, EigenCorrection):
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: the state has "
                f"{'corrected eigenvalues' if self.corrected else 'no corrected eigenvalues'}; "
                f"hessian_structure={self.approximation.structure!r} "
                f"{'needs' if not self.corrected else 'has none'}."
            )
        self._set_fitted(self._raw_fitted())
