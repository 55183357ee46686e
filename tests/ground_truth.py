"""Ground truth computed independently of BackPACK and of the package's solvers.

* Dense Van Loan–Pitsianis rearrangement and SVD for the optimal Kronecker error.
* Dense GGN blocks from ``torch.func`` per-sample Jacobians and an explicit
  (eigen-decomposition) square root of the per-sample loss Hessian.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev, vmap


def rearrange(dense: Tensor, m: int, n: int) -> Tensor:
    """Van Loan–Pitsianis rearrangement: ``F[(i,j),(i',j')] → A[(i,i'),(j,j')]``."""
    return dense.reshape(m, n, m, n).permute(0, 2, 1, 3).reshape(m * m, n * n)


def optimal_relative_error(dense: Tensor, m: int, n: int) -> float:
    """Relative Frobenius error of the best ``L ⊗ R`` (``L`` is ``m × m``)."""
    sv = torch.linalg.svdvals(rearrange(dense.double(), m, n))
    total = sv.square().sum()
    if total == 0:
        return 0.0
    return (sv[1:].square().sum() / total).sqrt().item()


def relative_error(dense: Tensor, left: Tensor, right: Tensor) -> float:
    """``‖F − L ⊗ R‖_F / ‖F‖_F`` computed densely in float64."""
    dense = dense.double()
    diff = dense - torch.kron(left.double(), right.double())
    return (torch.linalg.matrix_norm(diff) / torch.linalg.matrix_norm(dense)).item()


def sum_of_kron(left_terms: Tensor, right_terms: Tensor) -> Tensor:
    """Dense ``Σ_k L_k ⊗ R_k``."""
    return sum(torch.kron(a, b) for a, b in zip(left_terms, right_terms, strict=True))


def sum_of_outer(samples: Tensor) -> Tensor:
    """Dense ``Σ_k vec(X_k) vec(X_k)ᵀ``."""
    flat = samples.reshape(samples.shape[0], -1)
    return flat.T @ flat


def per_sample_loss_hessian_sqrt(loss_fn: nn.Module, outputs: Tensor, targets: Tensor) -> Tensor:
    """``[N, C, C]`` square roots ``V_n`` with ``V_n V_nᵀ = ∇²_f ℓ_n`` (eigh-based).

    The per-sample loss includes the reduction's scaling (``1/N`` for ``mean``; for
    ``MSELoss`` with ``mean`` also ``1/C``).
    """
    num = outputs.shape[0]
    scale = 1.0
    if loss_fn.reduction == "mean":
        scale = 1.0 / num
        if isinstance(loss_fn, nn.MSELoss):
            scale /= outputs[0].numel()
    summed = copy.deepcopy(loss_fn)
    summed.reduction = "sum"

    def single(out: Tensor, tgt: Tensor) -> Tensor:
        return summed(out.unsqueeze(0), tgt.unsqueeze(0)) * scale

    hess = vmap(hessian(single))(outputs.detach(), targets)
    evals, evecs = torch.linalg.eigh(hess)
    return evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)


def dense_ggn_sqrt(
    model: nn.Module, loss_fn: nn.Module, inputs: Tensor, targets: Tensor
) -> dict[str, Tensor]:
    """Per-parameter ``[N, C, *param.shape]`` square roots ``V_nᵀ J_n`` of the GGN.

    ``G_param = Σ_{n,c} vec(X_{n,c}) vec(X_{n,c})ᵀ``. Uses an un-extended deep copy of
    ``model`` (BackPACK's ``extend`` breaks ``torch.func``).
    """
    model = copy.deepcopy(model)
    for module in model.modules():
        module._forward_hooks.clear()
        module._backward_hooks.clear()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def forward(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(model, p, (x.unsqueeze(0),)).squeeze(0)

    jac = vmap(jacrev(forward), in_dims=(None, 0))(params, inputs)  # [N, C, *shape]
    outputs = functional_call(model, params, (inputs,))
    sqrt_h = per_sample_loss_hessian_sqrt(loss_fn, outputs, targets)  # [N, C, C]
    return {name: torch.einsum("ncd,nc...->nd...", sqrt_h, j) for name, j in jac.items()}


def dense_ggn_block(sqrt: Tensor) -> Tensor:
    """Dense GGN block from ``[N, C, *shape]`` square roots (row-major ``vec``)."""
    flat = sqrt.reshape(-1, sqrt[0, 0].numel())
    return flat.T @ flat
