"""``BlockLaplace``: laplace-torch's ``KronLaplace`` fitted by one of the package's approximations.

Every Laplace class of this package (:mod:`kfoc_backpack.laplace.classes`) is a
``BlockLaplace`` with a ``_key`` and an :class:`~kfoc_backpack.dataset.Approximation`
class. It has one constructor for all of them: laplace-torch's ``KronLaplace`` (or
``KronLLLaplace``) arguments, the approximation's own arguments (its dataclass fields),
and ``process_group`` — anything else is a ``TypeError`` naming what the class takes,
and ``inspect.signature`` shows exactly those. It overrides:

* ``fit`` — one :class:`~kfoc_backpack.dataset.DataPass` over the loader (Monte-Carlo
  labels seeded per batch, ``torch.distributed`` ranks combined) and the approximation's
  fit, instead of laplace-torch's per-batch ``kron`` sums; online, the earlier blocks
  enter the fit;
* ``_init_H`` — a zero ``Kron`` for weights of any dimension (``Conv3d``);
* ``posterior_precision`` — the typed blocks' eigenforms
  (:class:`~kfoc_backpack.laplace.posterior.BlockDecomposed`), ``damping`` kept;
* ``state_dict``/``load_state_dict`` — carry the raw blocks and the aggregation.

Index conventions: ``N`` (``n_data``) inputs of the data set (all ranks), ``δ`` the
prior precision.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch
from laplace.baselaplace import KronLaplace
from laplace.utils import Kron
from torch import Tensor
from torch.nn.utils import parameters_to_vector
from torch.utils.data import DataLoader

from kfoc_backpack._compat import supported_kwargs
from kfoc_backpack.blocks import Block
from kfoc_backpack.dataset import Approximation, DataPass, Fitted
from kfoc_backpack.dataset.distributed import Communication, Reducer
from kfoc_backpack.enums import Reduction
from kfoc_backpack.laplace.backend import batch_inputs, check_supported_layers, resolve_backend
from kfoc_backpack.laplace.errors import UnsupportedDtypeError
from kfoc_backpack.laplace.posterior import BlockDecomposed, BlockKron
from kfoc_backpack.laplace.predictive import glm_predictive
from kfoc_backpack.laplace.state import BlockState

Parameter = inspect.Parameter

LAPLACE_ARGUMENTS = {
    "sigma_noise": 1.0,
    "prior_precision": 1.0,
    "prior_mean": 0.0,
    "temperature": 1.0,
    "enable_backprop": False,
    "dict_key_x": "input_ids",
    "dict_key_y": "labels",
    "backend": None,
    "damping": False,
    "backend_kwargs": None,
    "asdl_fisher_kwargs": None,
}
"""laplace-torch's ``KronLaplace`` arguments after ``model`` and ``likelihood``, in order,
with their defaults."""


def zero_kron(params: list[Tensor], device: torch.device, dtype: torch.dtype) -> Kron:
    """laplace-torch's zero ``Kron`` of ``params`` before a fit (any weight dimension).

    A weight (``dim ≥ 2``) is the matrix of its first dimension against the rest, as
    laplace-torch's ``Kron.init_from_model`` lays out linear and convolution weights. The
    zeros are one stored number each, broadcast (a fit replaces them, never writes into
    them): a 30,522-row embedding table's ``V × V`` zero would hold 3.7 GB.
    """
    zero = torch.zeros((), device=device, dtype=dtype)
    kfacs = []
    for p in params:
        sizes = (p.shape[0], p[0].numel()) if p.dim() >= 2 else (p.numel(),)
        kfacs.append([zero.expand(n, n) for n in sizes])
    return Kron(kfacs)


class BlockLaplace(BlockState, KronLaplace):
    """``KronLaplace`` fitted by the class's approximation (see the module docstring)."""

    _key = None
    """Not a structure of its own: laplace-torch's ``Laplace`` maps ``_key`` to classes, and
    the inherited ``("all", "kron")`` would compete with ``KronLaplace``."""

    approximation_class: ClassVar[type[Approximation]]
    """The approximation the class fits (a sibling of :mod:`kfoc_backpack.dataset`)."""

    laplace_base: ClassVar[type] = KronLaplace
    """The laplace-torch class whose constructor takes the laplace-torch arguments."""

    laplace_arguments: ClassVar[dict[str, object]] = LAPLACE_ARGUMENTS
    """The laplace-torch arguments, in order, with their defaults."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Give a class that names its approximation the one constructor and its signature.

        The constructor goes on that class, not on ``BlockLaplace``: laplace-torch's
        ``LLLaplace.__init__`` calls ``super().__init__`` on its way to ``KronLaplace``,
        which must not come back here.
        """
        super().__init_subclass__(**kwargs)
        if "approximation_class" in cls.__dict__:
            cls.__signature__ = cls._signature()  # type: ignore[attr-defined]
            cls.__init__ = BlockLaplace._construct  # type: ignore[method-assign]

    @classmethod
    def _signature(cls) -> inspect.Signature:
        """``(model, likelihood, <laplace-torch's>, <the approximation's>, process_group)``."""
        kind = Parameter.POSITIONAL_OR_KEYWORD
        parameters = [Parameter("model", kind), Parameter("likelihood", kind)]
        parameters += [Parameter(n, kind, default=d) for n, d in cls.laplace_arguments.items()]
        approximation = cls.approximation_class
        for field in getattr(approximation, "__dataclass_fields__", {}).values():
            if field.init:
                parameters.append(Parameter(field.name, kind, default=field.default))
        parameters.append(Parameter("process_group", kind, default=None))
        return inspect.Signature(parameters)

    def _construct(self, *args: Any, **kwargs: Any) -> None:
        """Bind the arguments to the class's signature; build the approximation and base.

        Raises:
            TypeError: For an argument the class does not take, naming what it takes.
            ValueError: For invalid approximation arguments, or ``damping=True`` where
                the approximation has no factor eigenvalues.
        """
        try:
            bound = type(self).__signature__.bind(*args, **kwargs)  # type: ignore[attr-defined]
        except TypeError as error:
            raise TypeError(f"{type(self).__name__}: {error}. {self._takes()}") from None
        bound.apply_defaults()
        values = dict(bound.arguments)
        model, likelihood = values.pop("model"), values.pop("likelihood")
        process_group = values.pop("process_group")
        laplace = {name: values.pop(name) for name in self.laplace_arguments}
        self.approximation = self.approximation_class(**values)
        if laplace["damping"] and not self.approximation.supports_damping:
            raise ValueError(
                f"{type(self).__name__} (hessian_structure={self.approximation.structure!r}): "
                "damping=True adds √δ to each Kronecker factor's eigenvalues, which "
                "eigenvalue-corrected blocks do not have; use damping=False (the prior "
                "precision is added to every eigenvalue)."
            )
        self.process_group = process_group
        self.communication: Communication | None = None
        self._raw: dict[str, Block] = {}
        laplace["backend"] = resolve_backend(laplace["backend"], type(self).__name__)
        base = self.laplace_base
        base.__init__(self, model, likelihood, **supported_kwargs(base.__init__, laplace))
        self.damping = laplace["damping"]
        self._check_supported()

    @classmethod
    def _takes(cls) -> str:
        """Return what the class takes, for its ``TypeError``."""
        own = [
            f.name
            for f in getattr(cls.approximation_class, "__dataclass_fields__", {}).values()
            if f.init
        ]
        structure = cls.approximation_class.structure
        listed = ", ".join(own) if own else "no arguments of its own"
        return (
            f"hessian_structure={structure.value!r} takes laplace-torch's "
            f"{cls.laplace_base.__name__} arguments, process_group, and {listed}."
        )

    @property
    def aggregation(self) -> str:
        """How the per-batch curvature is aggregated over the data set."""
        return self.approximation.aggregation.value

    def _check_supported(self) -> None:
        """Reject trainable layers without K-FOC factors, before any work."""
        check_supported_layers(self.model, type(self).__name__)

    def _check_dtype(self) -> None:
        """Reject half precisions, which the eigendecompositions cannot take.

        ``torch.linalg.eigh`` has no float16/bfloat16 kernels; this raises first, an
        :class:`~kfoc_backpack.laplace.errors.UnsupportedDtypeError` (a ``TypeError``
        and a ``ValueError``, which laplace-torch's callers catch).
        """
        if self._dtype in (torch.float16, torch.bfloat16):
            raise UnsupportedDtypeError(
                f"{type(self).__name__}: the model's parameters are {self._dtype}; "
                "laplace-torch's Kronecker eigendecomposition needs float32 or float64. "
                "Fit on a float32 copy (model.float()) and cast the inputs alike."
            )

    def _init_H(self) -> None:
        self.H = zero_kron(self.params, self._device, self._dtype)

    def _check_batch(self, X: Tensor, y: Tensor) -> None:
        if self.likelihood == "regression" and y.ndim != self._out_ndim:
            raise ValueError(
                f"The model's output has {self._out_ndim} dims but the target has {y.ndim} dims."
            )

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
        """Fit the Laplace approximation at the current parameters.

        Under ``torch.distributed`` (or with ``process_group``), each rank passes its
        shard of the data; every rank ends with the same blocks, loss and ``n_data``
        (the inputs of all shards), see docs/conventions.md §8. A Monte-Carlo Fisher
        draws one base seed from torch's global generator and seeds every batch from
        it (docs/conventions.md §4).

        Args:
            train_loader: Batches ``(X, y)`` or dict-like batches (the whole mapping
                is the model input, ``batch[dict_key_y]`` the targets);
                ``len(train_loader.dataset)`` (or, without a ``dataset``, the number
                of inputs seen; in a distributed fit the inputs of all ranks) is ``N``.
            override: Start afresh (``True``) or add the data to the current fit
                (online learning): the earlier blocks enter the fit as one more term
                (``"running"``/``"optimal"``: optimally merged; ``"approx"`` and K-FAC:
                factor-wise sums, as ``KronLaplace`` does; eigenvalue-corrected: the
                earlier eigenvalues projected onto the new basis).
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
        self.model.eval()  # as laplace-torch's fit, before the model first runs
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
        self.mean = parameters_to_vector(self.params)
        if not self.enable_backprop:
            self.mean = self.mean.detach()
        backend, owner = self.backend, type(self).__name__
        data = DataPass(
            backend.collector,
            train_loader,
            backend.named_trainable,
            split=backend.splitter(self._check_batch, owner),
            curvature=backend.curvature,
            reduction=Reduction.SUM,
            progress_bar=progress_bar or getattr(self, "_progress_bar", False),
            process_group=reducer,
            owner=owner,
        )
        self.approximation.solver_options = backend.solver_options
        earlier = None
        if online:
            loss = torch.as_tensor(self.loss) / float(backend.factor)
            earlier = Fitted(loss, self._raw, self.n_data)
        fitted = self.approximation.fit(data, earlier)
        self.communication = reducer.log
        self.loss = self.loss + backend.factor * fitted.loss
        dataset = getattr(train_loader, "dataset", None)
        use_len = dataset is not None and not reducer.active
        self.n_data += len(dataset) if use_len else fitted.num_samples
        self._set_fitted(fitted.blocks)

    def _set_fitted(self, blocks: dict[str, Block]) -> None:
        """``H_facs`` and ``H`` from raw blocks (times laplace-torch's likelihood factor)."""
        self._raw = {name: block.to(dtype=self._dtype) for name, block in blocks.items()}
        self.H_facs = BlockKron(list(self._raw.values())) * float(self.backend.factor)
        self.H = self.H_facs.decompose(damping=self.damping)

    def _glm_predictive_distribution(
        self, X: Any, joint: bool = False, diagonal_output: bool = False
    ) -> tuple[Tensor, Tensor]:
        """``(f_mu, f_var)`` of the GLM predictive, the output covariance a parameter at a time.

        Never forms laplace-torch's ``(batch, outputs, parameters)`` Jacobian
        (:mod:`kfoc_backpack.laplace.predictive`); with ``enable_backprop`` (gradients
        through the predictive) laplace-torch's own Jacobian route is taken.
        """
        if self.enable_backprop:
            return super()._glm_predictive_distribution(X, joint, diagonal_output)
        f_mu, f_var = glm_predictive(self, X, joint)
        if joint:
            f_mu = f_mu.flatten()  # laplace-torch's joint layout: (batch·outputs,)
        elif diagonal_output:
            f_var = torch.diagonal(f_var, dim1=-2, dim2=-1)
        return f_mu, f_var

    @property
    def posterior_precision(self) -> BlockDecomposed:
        """Posterior precision ``H · factor + P₀`` in the blocks' eigenforms, damping kept."""
        self._check_H_init()
        return self.H * self._H_factor + self.prior_precision

    @property
    def posterior_covariance(self) -> Tensor:
        """Dense ``[P, P]`` posterior covariance ``(H · factor + P₀)⁻¹`` (small models).

        laplace-torch's ``KronLaplace`` has none; this is the posterior precision's
        eigenforms at exponent ``-1``, block-diagonal over the parameters.
        """
        return self.posterior_precision.to_matrix(exponent=-1)

    @property
    def posterior_variance(self) -> Tensor:
        """``[P]`` diagonal of the posterior covariance, without forming it."""
        return self.posterior_precision.diag(exponent=-1)
