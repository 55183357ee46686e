"""``KFOCBackend``: a laplace-torch curvature backend with K-FOC Kronecker factors.

``kron()`` returns, per parameter, K-FOC's Frobenius-optimal ``[L_out, R_in]`` for
weights and the exact block ``[B]`` for biases, in laplace-torch's ``Kron`` layout and
scaling (the same as ``BackPackGGN.kron``: the loss is summed over the batch, the
input-side factor is rescaled by ``M/N`` so that factor-wise sums over batches
approximate the data set, and the likelihood ``factor`` is spread over both
factors). The other methods (``diag``, ``jacobians``, ``gradients``, ``full``)
compute what the BackPACK backend computes, but

* the model is extended with BackPACK only during each call (a model extended by
  BackPACK breaks ``torch.func``, and laplace-torch special-cases BackPACK backends by
  class and name — DESIGN §6); ``.grad`` of the parameters is left untouched;
* only trainable parameters count, so models with frozen parameters (a last-layer
  Laplace on a frozen backbone, a frozen feature extractor) work.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch
from backpack import backpack
from backpack.extensions import BatchGrad, DiagGGNExact, DiagGGNMC
from laplace.curvature import GGNInterface
from laplace.utils import Kron
from torch import Tensor
from torch.nn import Conv1d, Conv2d, Conv3d, Linear, Module, Parameter

from kfoc_backpack._compat import supported_kwargs
from kfoc_backpack.extensions import KFOC, KFOCExact
from kfoc_backpack.extensions.accumulate import extended, preserved_grads
from kfoc_backpack.extensions.unsupported import SUPPORTED_LAYERS
from kfoc_backpack.solver import DEFAULT_MAX_ITER, DEFAULT_TOL

SUPPORTED_LAYER_TYPES = (Linear, Conv1d, Conv2d, Conv3d)

_DICT_MESSAGE = (
    "{owner} needs batches (X, y) of tensors: BackPACK, which K-FOC builds on, does not "
    "support dict-like inputs (got {kind}). Use hessian_structure='kron' with "
    "backend=CurvlinopsGGN or AsdlGGN for models with dict-like inputs."
)


def check_tensor_input(x: object, owner: str = "KFOCBackend") -> None:
    """Reject dict-like or other non-tensor inputs with a clear message.

    Raises:
        ValueError: If ``x`` is not a tensor.
    """
    if not isinstance(x, Tensor):
        kind = "a dict-like input" if isinstance(x, MutableMapping) else type(x).__name__
        raise ValueError(_DICT_MESSAGE.format(owner=owner, kind=kind))


def check_supported_layers(module: Module, owner: str = "KFOCBackend") -> None:
    """Check that every layer with trainable parameters has K-FOC factors.

    Layers are matched by exact type, as BackPACK matches them; convolutions need
    ``groups=1``, integer padding and ``padding_mode='zeros'``.

    Args:
        module: The module whose trainable parameters get curvature.
        owner: Name used in the error message.

    Raises:
        NotImplementedError: Naming the first unsupported layer and what is supported.
    """
    for name, sub in module.named_modules():
        if not any(p.requires_grad for p in sub.parameters(recurse=False)):
            continue
        where = f"layer '{name}' ({type(sub).__name__})" if name else type(sub).__name__
        if type(sub) not in SUPPORTED_LAYER_TYPES:
            raise NotImplementedError(
                f"{owner}: {where} has trainable parameters but no K-FOC factors. "
                f"Supported parameterised layers: {SUPPORTED_LAYERS}. Freeze its "
                "parameters (requires_grad=False) or use subset_of_weights='last_layer'."
            )
        if isinstance(sub, Linear):
            continue
        problem = None
        if sub.groups != 1:
            problem = f"groups={sub.groups}"
        elif isinstance(sub.padding, str):
            problem = f"padding={sub.padding!r}"
        elif sub.padding_mode != "zeros":
            problem = f"padding_mode={sub.padding_mode!r}"
        if problem is not None:
            raise NotImplementedError(
                f"{owner}: {where} with {problem} is not supported; K-FOC supports "
                "convolutions with groups=1, integer padding and padding_mode='zeros'."
            )


def zero_block(param: Tensor) -> list[Tensor]:
    """Zero ``[L_out, R_in]`` (weights, ``ndim ≥ 2``) or ``[B]`` (biases) of a parameter."""
    kw = {"dtype": param.dtype, "device": param.device}
    if param.dim() == 1:
        return [torch.zeros(param.numel(), param.numel(), **kw)]
    out, fan_in = param.shape[0], param[0].numel()
    return [torch.zeros(out, out, **kw), torch.zeros(fan_in, fan_in, **kw)]


class KFOCBackend(GGNInterface):
    """laplace-torch curvature backend whose ``kron()`` returns K-FOC factors.

    Use it wherever laplace-torch takes a backend, e.g.
    ``Laplace(model, "classification", hessian_structure="kron",
    backend=KFOCBackend)``, or through ``hessian_structure="kfoc"``
    (:class:`~kfoc_backpack.laplace.KFOCLaplace`), which adds aggregation over
    batches. ``backend_kwargs={"stochastic": True}`` gives the Monte-Carlo Fisher
    (``num_samples`` labels per input) instead of the exact GGN, as for
    ``BackPackGGN``.

    Args:
        model: The model (or laplace-torch's ``FeatureExtractor``).
        likelihood: ``"classification"`` or ``"regression"``.
        last_layer: Curvature of the last layer only.
        subnetwork_indices: Indices into the trainable parameters (``diag``,
            ``jacobians`` and ``gradients`` only, as for BackPACK).
        dict_key_x: Accepted for laplace-torch; dict-like inputs are rejected.
        dict_key_y: Accepted for laplace-torch; dict-like inputs are rejected.
        stochastic: Monte-Carlo Fisher (``True``) or exact GGN (default).
        num_samples: Sampled labels per input for the Monte-Carlo Fisher.
        tol: Tolerance of the per-batch K-FOC solves.
        max_iter: Iteration cap of the per-batch K-FOC solves.

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
        super().__init__(model, likelihood, **supported_kwargs(GGNInterface.__init__, kwargs))
        self.last_layer = last_layer
        self.subnetwork_indices = subnetwork_indices
        self.stochastic = stochastic
        self.num_samples = int(num_samples)
        self.tol = tol
        self.max_iter = max_iter
        check_supported_layers(self._model, type(self).__name__)

    # ----------------------------------------------------------------------------------
    # helpers
    # ----------------------------------------------------------------------------------

    @property
    def named_trainable(self) -> dict[str, Parameter]:
        """Trainable parameters that get curvature, by name, in laplace's order."""
        return {name: p for name, p in self._model.named_parameters() if p.requires_grad}

    def _outputs_targets(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        f = self.model(x)
        if self.likelihood == "regression":
            return f, y
        return f.view(-1, f.size(-1)), y.view(-1)

    def run_batch(self, x: Tensor, y: Tensor, extension: Any) -> Tensor:
        """Forward and backward of one batch with a BackPACK ``extension`` active.

        Only ``self._model`` (the last layer for last-layer Laplace) and the loss are
        extended, and only for the duration of the call.

        Args:
            x: ``[N, *]`` inputs.
            y: Targets.
            extension: A BackPACK extension (e.g. ``KFOCExact()``).

        Returns:
            The summed loss, detached, without laplace-torch's ``factor``.
        """
        check_tensor_input(x, type(self).__name__)
        params = list(self.named_trainable.values())
        with preserved_grads(params), extended(self._model, self.lossfunc), torch.enable_grad():
            loss = self.lossfunc(*self._outputs_targets(x, y))
            with backpack(extension):
                loss.backward()
        return loss.detach()

    def _collect(self, savefield: str) -> list[list[Tensor]]:
        """Read (and remove) ``savefield`` of every trainable parameter."""
        blocks = []
        for param in self.named_trainable.values():
            value = getattr(param, savefield, None)
            if value is None:  # the parameter is not used by the forward pass
                blocks.append(zero_block(param))
                continue
            delattr(param, savefield)
            blocks.append(list(value) if isinstance(value, (list, tuple)) else [value])
        return blocks

    def kfoc_extension(self) -> KFOC | KFOCExact:
        """Return the BackPACK extension for one batch's K-FOC factors."""
        if self.stochastic:
            return KFOC(mc_samples=self.num_samples, tol=self.tol, max_iter=self.max_iter)
        return KFOCExact(tol=self.tol, max_iter=self.max_iter)

    # ----------------------------------------------------------------------------------
    # curvature
    # ----------------------------------------------------------------------------------

    def kfoc(self, x: Tensor, y: Tensor) -> tuple[Tensor, list[list[Tensor]]]:
        """K-FOC factors of one batch for the summed loss, without rescaling.

        Args:
            x: ``[M, *]`` inputs.
            y: Targets.

        Returns:
            ``(loss, blocks)``: the summed loss and, per trainable parameter,
            ``[L_out, R_in]`` with ``L_out ⊗ R_in`` optimal for the batch's GGN (or
            MC Fisher) block of the *summed* loss and ``tr(R_in) = (1/M) Σ_m ‖â_m‖²``
            (K-FAC's split), or ``[B]``. laplace-torch's ``factor`` is not applied.
        """
        ext = self.kfoc_extension()
        loss = self.run_batch(x, y, ext)
        return loss, self._collect(ext.savefield)

    def kron(self, x: Tensor, y: Tensor, N: int, **kwargs: Any) -> tuple[Tensor, Kron]:
        """K-FOC factors of one batch in laplace-torch's ``Kron`` layout and scaling.

        Args:
            x: ``[M, *]`` inputs.
            y: Targets.
            N: Number of data points of the whole data set.
            **kwargs: Ignored (laplace-torch passes backend-specific options).

        Returns:
            ``(factor · loss, factor · Kron)``; weights' ``R_in`` carry ``M/N`` like
            ``BackPackGGN``'s, so that factor-wise sums over the batches give
            K-FOC_approx of the data set.
        """
        loss, blocks = self.kfoc(x, y)
        ratio = x.shape[0] / N
        for block in blocks:
            if len(block) == 2:
                block[1] = block[1] * ratio
        return self.factor * loss, Kron(blocks) * self.factor

    def diag(self, x: Tensor, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Diagonal of the GGN (or MC Fisher) of one batch, as ``BackPackGGN.diag``.

        Returns:
            ``(factor · loss, factor · diag)`` with ``diag`` of shape ``[P]``.
        """
        ext = DiagGGNMC(mc_samples=self.num_samples) if self.stochastic else DiagGGNExact()
        loss = self.run_batch(x, y, ext)
        diag = torch.cat([block[0].flatten() for block in self._collect_diag(ext.savefield)])
        if self.subnetwork_indices is not None:
            diag = diag[self.subnetwork_indices]
        return self.factor * loss, self.factor * diag

    def _collect_diag(self, savefield: str) -> list[list[Tensor]]:
        blocks = []
        for param in self.named_trainable.values():
            value = getattr(param, savefield, None)
            if value is None:
                value = torch.zeros_like(param)
            else:
                delattr(param, savefield)
            blocks.append([value])
        return blocks

    # ----------------------------------------------------------------------------------
    # first order
    # ----------------------------------------------------------------------------------

    def jacobians(
        self, x: Tensor | MutableMapping, enable_backprop: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Jacobians of the outputs w.r.t. the trainable parameters (BackPACK ``BatchGrad``).

        Args:
            x: ``[B, *]`` inputs.
            enable_backprop: Keep the graph through ``Js`` and ``f``.

        Returns:
            ``(Js, f)``: ``[B, C, P]`` Jacobians and ``[B, C]`` outputs.
        """
        check_tensor_input(x, type(self).__name__)
        params = list(self.named_trainable.values())
        input_grad = x.grad.detach().clone() if x.is_leaf and x.grad is not None else None
        columns, f = [], None
        with preserved_grads(params), extended(self._model), torch.enable_grad():
            num_outputs = 1
            index = 0
            while index < num_outputs:
                out = self.model(x)
                if f is None:
                    f = out
                    if out.dim() != 2:
                        raise ValueError(
                            f"{type(self).__name__}.jacobians needs outputs of shape "
                            f"[batch, outputs], got {tuple(out.shape)}."
                        )
                    num_outputs = out.shape[1]
                with backpack(BatchGrad()):
                    out[:, index].sum().backward(
                        create_graph=enable_backprop, retain_graph=enable_backprop
                    )
                columns.append(self._grad_batch(params, x.shape[0]))
                index += 1
        if x.is_leaf and x.requires_grad:
            x.grad = input_grad
        Js = torch.stack(columns, dim=1)
        return (Js, f) if enable_backprop else (Js.detach(), f.detach())

    def _grad_batch(self, params: list[Parameter], batch: int) -> Tensor:
        grads = []
        for param in params:
            value = getattr(param, "grad_batch", None)
            if value is None:
                value = param.new_zeros(batch, param.numel())
            else:
                delattr(param, "grad_batch")
            grads.append(value.reshape(batch, -1))
        grads = torch.cat(grads, dim=1)
        if self.subnetwork_indices is not None:
            grads = grads[:, self.subnetwork_indices]
        return grads

    def gradients(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample gradients of the summed loss (BackPACK ``BatchGrad``).

        Returns:
            ``(Gs, loss)``: ``[B, P]`` gradients and the summed loss.
        """
        loss = self.run_batch(x, y, BatchGrad())
        params = list(self.named_trainable.values())
        return self._grad_batch(params, x.shape[0]), loss
