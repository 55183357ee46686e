r"""The GLM predictive without the Jacobian: the output covariance a parameter at a time.

laplace-torch's GLM predictive forms the Jacobian of every output with respect to every
parameter, ``(batch, outputs, parameters)`` numbers — 40 GB for ResNet-18 at 32 inputs —
before it multiplies it with the posterior. Here the output covariance

.. math::
    \mathrm{Cov}[f(x)] = Σ_{\text{parameters}} J_θ (P_θ + δ_θ)^{-1} J_θᵀ

is summed parameter by parameter: each trainable parameter's Jacobian comes in its
layer's own form (:mod:`kfoc_backpack.collect.jacobians`: a weight's output-side vectors
and inputs at its positions, a bias's rows) and its posterior block answers for its share
(:meth:`kfoc_backpack.blocks.Decomposed.output_covariance`: a Kronecker or
eigenvalue-corrected block rotates the factors into its eigenbasis and weighs them by
the inverse spectrum). A block of inputs at a time, so that the largest intermediate
holds at most :data:`CHUNK_ELEMENTS` numbers per layer; the memory beyond the model's own
forward and backward (one backward per output unit) grows with the largest layer, not
with the number of parameters.

Index conventions: ``N`` inputs, ``C`` outputs per input.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from kfoc_backpack.collect.jacobians import chunks

if TYPE_CHECKING:
    from kfoc_backpack.laplace.base import BlockLaplace

CHUNK_ELEMENTS = 1 << 24
"""Numbers of one parameter's rotated Jacobian held at once (64 MB in float32)."""


def glm_predictive(la: BlockLaplace, X: Any, joint: bool = False) -> tuple[Tensor, Tensor]:
    """``(f_mu, f_var)`` of the GLM predictive at ``X``, the Jacobian never formed.

    Args:
        la: A fitted Laplace approximation of this package (all weights).
        X: ``[N, *]`` inputs (or a dict-like batch).
        joint: The covariance between all inputs' outputs (``[N·C, N·C]``, input-major),
            as laplace-torch's ``joint=True``; else each input's ``[N, C, C]``.

    Returns:
        ``f_mu`` ``[N, C]`` and ``f_var``, detached.
    """
    if isinstance(X, Tensor):
        X = X.to(la._device)
    precision = la.posterior_precision
    trainable = list(la.backend.named_trainable)
    deltas = precision.deltas.expand(len(precision.blocks))
    jacobians = la.backend.collector.output_jacobians(X)
    f_mu = jacobians.output
    num, outputs = f_mu.shape
    shape = (num * outputs, num * outputs) if joint else (num, outputs, outputs)
    f_var = f_mu.new_zeros(shape)
    with torch.no_grad():
        for name, jacobian in jacobians.parameters.items():
            index = trainable.index(name)
            block, delta = precision.blocks[index], deltas[index]
            if joint:
                f_var += block.output_covariance(jacobian, delta, precision.damping, joint)
                continue
            size = max(1, CHUNK_ELEMENTS // max(outputs * block.size, 1))
            for start, part in chunks(jacobian, size):
                share = block.output_covariance(part, delta, precision.damping)
                f_var[start : start + part.num_inputs] += share
    return f_mu.detach(), f_var.detach()
