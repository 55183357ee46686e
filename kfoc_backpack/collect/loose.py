r"""Per-sample gradients of the parameters no module kind describes.

A ``cls_token`` or ``pos_embed`` registered on a model, a layer scale ``gamma``, an
``RMSNorm`` of a library's own, a convolution with ``padding="same"`` — any trainable
parameter outside :mod:`kfoc_backpack.collect.kinds` — has no layer input whose
second moment would give its block, but it has per-sample gradients: for each input
``n`` and output-side vector ``v_{m,n}``, ``b_{m,n} = ∂⟨f(x_n), v_{m,n}⟩/∂θ``. Two ways
to them, both ending in the size rule of :mod:`kfoc_backpack.collect.parameters`:

* :class:`StandIns` — a parameter with a leading dimension of one (``cls_token``
  ``[1, 1, D]``, ``pos_embed`` ``[1, T, D]``), which models broadcast over the batch
  (``cls_token.expand(N, -1, -1)``, ``x + pos_embed``), is given one copy per input
  for the hook route's own forward pass (``torch.func.functional_call``): the gradients
  at the copies, from the same backward pass as every layer's, are the per-sample
  gradients — no extra pass. The hook route checks on its first batch of several
  inputs that the model's output is unchanged and that input 0's output reaches only
  copy 0; a parameter that fails goes the second way;
* :class:`LooseParameters` — every other one: ``torch.func.vmap`` over the batch's
  inputs of the model run on one input, pulled back (``torch.func.vjp``) with the
  ``M`` vectors — one more (vectorised) forward and backward pass of the model per
  batch, only where such parameters exist.

Each input must be a separate sample of the model (what the hook route checks for every
layer anyway): the model runs on input ``n`` alone as a batch of one. Parameters with
more than :data:`MAX_ENTRIES` entries are refused before any computation (their
per-sample gradients would hold ``M·N·P`` numbers per batch).

Index conventions: ``M`` vectors per input, ``N`` inputs, ``C`` outputs per input.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call, vjp, vmap
from torch.nn import Module
from torch.utils._pytree import tree_map

MAX_ENTRIES = 1 << 20
"""Largest parameter (entries) whose per-sample gradients are computed (``M·N`` copies of
it per batch: 1.3 GB in float32 for ``M·N = 320``)."""


class _Call(Module):
    """``forward(X)`` as a module holding ``model`` (``functional_call`` swaps its parameters)."""

    def __init__(self, model: Module, forward: Callable[[Any], Tensor] | None):
        super().__init__()
        self.model = model
        self.calls = () if forward is None else (forward,)  # not a submodule: the model once

    def forward(self, X: Any) -> Tensor:
        return self.calls[0](X) if self.calls else self.model(X)


def broadcastable(shape: torch.Size | tuple[int, ...]) -> bool:
    """Whether a parameter of ``shape`` may be given one copy per input (leading size one)."""
    return len(shape) >= 1 and shape[0] == 1


class StandIns:
    """One copy per input of parameters with a leading dimension of one, for a forward pass.

    Args:
        model: The model.
        names: Full names of its parameters to stand in for.
        forward: ``forward(X) -> output`` (default ``model(X)``).
    """

    def __init__(
        self, model: Module, names: list[str], forward: Callable[[Any], Tensor] | None = None
    ):
        self.names = list(names)
        self.call = _Call(model, None if forward is model else forward)

    def __bool__(self) -> bool:
        return bool(self.names)

    def values(self, num: int) -> dict[str, Tensor]:
        """Return ``[num, *shape[1:]]`` copies of each parameter, leaves that require grad."""
        params = dict(self.call.model.named_parameters(remove_duplicate=False))
        return {
            name: params[name]
            .detach()
            .expand(num, *params[name].shape[1:])
            .clone()
            .requires_grad_()
            for name in self.names
        }

    def forward(self, X: Any, values: dict[str, Tensor]) -> Tensor:
        """Run the model on ``X`` with ``values`` in place of the parameters."""
        swapped = {f"model.{name}": value for name, value in values.items()}
        return functional_call(self.call, swapped, (X,), strict=False)


class LooseParameters:
    """Per-sample gradients of named parameters of a model, by ``torch.func``.

    Args:
        model: The model.
        names: Full names of its parameters to differentiate.
        forward: ``forward(X) -> output`` (default ``model(X)``).
        owner: Name used in error messages.
    """

    def __init__(
        self,
        model: Module,
        names: list[str],
        forward: Callable[[Any], Tensor] | None = None,
        owner: str = "K-FOC",
    ):
        self.names, self.owner = list(names), owner
        self.call = _Call(model, None if forward is model else forward)

    def __bool__(self) -> bool:
        return bool(self.names)

    def rows(self, X: Any, vectors: Tensor) -> dict[str, Tensor]:
        """Return ``[M, N, *shape]`` per-sample gradients of ``⟨f(x_n), v_{m,n}⟩`` per parameter.

        Args:
            X: The batch's model input (a tensor or a mapping/sequence of tensors whose
                dimension 0 indexes the ``N`` inputs).
            vectors: ``[M, N, *output]`` output-side vectors (``output`` the model
                output of one input).

        Raises:
            NotImplementedError: Where ``torch.func.vmap`` cannot run the model (naming
                the parameters and the reason).
        """
        if not self.names:
            return {}
        params = dict(self.call.model.named_parameters(remove_duplicate=False))
        theta = {name: params[name].detach() for name in self.names}
        in_dims = tree_map(lambda leaf: 0 if isinstance(leaf, Tensor) else None, X)

        def output(values: dict[str, Tensor], x: Any) -> Tensor:
            one = tree_map(lambda leaf: leaf.unsqueeze(0) if isinstance(leaf, Tensor) else leaf, x)
            swapped = {f"model.{name}": value for name, value in values.items()}
            return functional_call(self.call, swapped, (one,), strict=False)[0]

        def per_input(x: Any, v: Tensor) -> dict[str, Tensor]:
            _, pullback = vjp(lambda values: output(values, x), theta)
            return vmap(pullback)(v)[0]  # [M, *shape] per name

        try:
            with torch.no_grad():
                rows = vmap(per_input, in_dims=(in_dims, 1))(X, vectors)
        except (RuntimeError, ValueError, TypeError) as error:
            raise NotImplementedError(
                f"{self.owner}: the per-sample gradients of {', '.join(self.names)} "
                "(parameters of modules without K-FOC factors) are computed by "
                f"torch.func.vmap over the inputs, which failed on this model: {error} "
                "Freeze them (requires_grad=False) or kfoc_backpack.freeze_unsupported(model)."
            ) from error
        return {name: rows[name].transpose(0, 1) for name in self.names}
