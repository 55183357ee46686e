r"""Per-sample gradients of a measurement, one backward pass per batch.

An influence score needs, for every training input, the gradient of its own loss, and for
every test input the gradient of what is measured on it (its loss, or a classifier's
margin). Both are the model's output Jacobian pulled back along one output-side vector
per input, ``∇_θ m(f(x_n), y_n) = J_nᵀ ∂m/∂f_n``: the hook route's
:meth:`~kfoc_backpack.collect.TermCollector.output_jacobians` pulls back the ``N``
vectors ``∂m/∂f_n`` in one backward pass, and every trainable parameter's gradient comes
in its layer's own form (a weight's output-side vectors and inputs at its positions, a
bias's rows; :mod:`kfoc_backpack.collect.jacobians`), never by a loop over inputs.

Index conventions: ``N`` inputs, ``C`` outputs per input, ``P`` a parameter's entries.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor
from torch.nn import CrossEntropyLoss, Module

from kfoc_backpack.blocks.base import Jacobian
from kfoc_backpack.collect.hooks import TermCollector
from kfoc_backpack.collect.loss import check_loss, output_vectors
from kfoc_backpack.enums import Curvature, Measurement


def summed(lossfunc: Module) -> Module:
    """Return a copy of ``lossfunc`` that sums over inputs (each input's own loss)."""
    check_loss(lossfunc, "influence")
    total = copy.copy(lossfunc)
    total.reduction = "sum"
    return total


def margin(output: Tensor, target: Tensor) -> Tensor:
    """``[N]``: ``f_y − log Σ_{c≠y} exp f_c`` of ``[N, C]`` logits and ``[N]`` classes."""
    true = output.gather(1, target.reshape(-1, 1)).squeeze(1)
    others = output.scatter(1, target.reshape(-1, 1), float("-inf"))
    return true - torch.logsumexp(others, dim=1)


def measurement_vectors(
    lossfunc: Module, output: Tensor, target: Tensor, measurement: Measurement | str
) -> Tensor:
    """Return ``[1, N, C]``: each input's ``∂m(f_n, y_n)/∂f_n``.

    Args:
        lossfunc: The training loss (``MSELoss``, ``CrossEntropyLoss`` or
            ``BCEWithLogitsLoss``; its reduction is ignored: each input's own loss).
        output: ``[N, C]`` model output.
        target: The targets as the loss takes them.
        measurement: :class:`~kfoc_backpack.enums.Measurement`.

    Raises:
        ValueError: For ``"margin"`` with another loss than cross-entropy, or an output
            of another shape than ``[N, C]`` with ``C ≥ 2``.
    """
    measurement = Measurement.parse(measurement, "measurement")
    if measurement is Measurement.LOSS:
        return output_vectors(summed(lossfunc), output, target, Curvature.EF)
    if not isinstance(lossfunc, CrossEntropyLoss) or output.dim() != 2 or output.shape[1] < 2:
        raise ValueError(
            "measurement='margin' is a classifier's margin: it needs CrossEntropyLoss and "
            f"a model output [N, C] with C ≥ 2, got {type(lossfunc).__name__} and "
            f"{tuple(output.shape)}; use measurement='loss'."
        )
    with torch.enable_grad():
        f = output.detach().requires_grad_(True)
        (vectors,) = torch.autograd.grad(margin(f, target.reshape(-1)).sum(), f)
    return vectors.unsqueeze(0)


def gradients(
    collector: TermCollector,
    X: object,
    y: Tensor,
    measurement: Measurement | str = Measurement.LOSS,
) -> dict[str, Jacobian]:
    """Per trainable parameter the batch used, its per-sample gradients of the measurement.

    Args:
        collector: The hook route on the model, with the training loss.
        X: ``[N, *]`` inputs (or a dict-like batch).
        y: The targets.
        measurement: :class:`~kfoc_backpack.enums.Measurement`.

    Returns:
        Per parameter name, a Jacobian whose ``rows()`` are ``[1, N, P]``: the ``N``
        inputs' gradients, in the parameter's row-major ``vec`` order.
    """

    def vectors(output: Tensor) -> Tensor:
        return measurement_vectors(collector.lossfunc, output, y.to(output.device), measurement)

    return collector.output_jacobians(X, vectors).parameters
