"""The linearised (``glm``) Laplace predictive, computed from a posterior's public factors.

laplace-torch's own ``la(x, pred_type="glm")`` forms the dense ``[N, C, P]`` Jacobians
and projects each one through the posterior (``integration/posterior.py`` says what that
costs). Here the Jacobians are kept per parameter block, a ``Linear`` weight's as the
outer product of the output gradients and the layer inputs (:func:`jacobian_features`),
and ``diag(J P⁻¹ Jᵀ)`` is read from the posterior's public factors
(:class:`FunctionalVariance`): ``posterior_precision``'s eigendecomposition for the
Kronecker methods (``KronLaplace``, also ``KFOCLaplace``), ``posterior_variance`` for
``diag``, ``posterior_covariance`` for ``full``. :func:`predictive` turns outputs and
functional variances into the probit (classification) or Gaussian (regression)
predictive, and :func:`check_against_laplace` compares the result with laplace-torch's
own predictive (tolerances :data:`PREDICTIVE_TOL`).

Shapes: ``N`` inputs, ``C`` model outputs (the classes; 1 in regression), ``P``
parameters. A Jacobian block is ``J[n, c, :]``, the derivative of output ``c`` at input
``n`` by the block's parameters, flattened row-major as ``parameter.flatten()`` (a
``[out, in]`` weight: index ``o · in + i``; a ``[out, in, kh, kw]`` kernel likewise); the
blocks follow ``model.parameters()`` order, which is laplace-torch's block order.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PREDICTIVE_TOL = {"classification": 1e-4, "regression": 1e-3}
"""Largest difference to laplace-torch's predictive that ``--check-predictive`` accepts:
absolute on class probabilities, relative on regression variances."""


@dataclass
class OuterBlock:
    """Jacobian of a ``Linear`` weight: ``J[n, c] = g[n, c] ⊗ a[n]`` (row-major ``vec``).

    Attributes:
        g: ``[N, C, out]`` gradients of output ``c`` w.r.t. the layer's output.
        a: ``[N, in]`` the layer's inputs.
    """

    g: Tensor
    a: Tensor

    @property
    def numel(self) -> int:
        """Number of parameters of the block."""
        return self.g.shape[-1] * self.a.shape[-1]

    def dense(self) -> Tensor:
        """``[N, C, out·in]`` dense Jacobian."""
        return torch.einsum("nco,ni->ncoi", self.g, self.a).flatten(2)


@dataclass
class DenseBlock:
    """Jacobian of a parameter as a dense ``[N, C, p]`` tensor (biases, convolutions)."""

    J: Tensor

    @property
    def numel(self) -> int:
        """Number of parameters of the block."""
        return self.J.shape[-1]

    def dense(self) -> Tensor:
        """``[N, C, p]`` dense Jacobian."""
        return self.J


Block = OuterBlock | DenseBlock


@dataclass
class Features:
    """What the glm predictive needs of one evaluation set: outputs and Jacobians.

    Attributes:
        f_mu: ``[N, C]`` outputs of the MAP model.
        blocks: Jacobian blocks, one per trainable parameter in ``model.parameters()``
            order (laplace-torch's block order).
    """

    f_mu: Tensor
    blocks: list[Block]

    def __len__(self) -> int:
        return self.f_mu.shape[0]


def _cat_blocks(parts: list[list[Block]]) -> list[Block]:
    blocks = []
    for column in zip(*parts):
        if isinstance(column[0], OuterBlock):
            blocks.append(
                OuterBlock(torch.cat([b.g for b in column]), torch.cat([b.a for b in column]))
            )
        else:
            blocks.append(DenseBlock(torch.cat([b.J for b in column])))
    return blocks


def jacobian_features(model: nn.Module, inputs: Tensor, chunk: int = 250) -> Features:
    """Return the outputs and per-parameter Jacobian factors of ``model`` on ``inputs``.

    One forward pass and one backward pass per output (per chunk of ``chunk`` inputs);
    forward hooks record each layer's input and output. ``Linear`` weights keep the
    outer-product form, ``Conv2d`` weights and all biases are dense.

    Raises:
        NotImplementedError: For a trainable module other than ``Linear`` (2-d input) or
            ``Conv2d`` (``groups=1``, zero padding given as integers).
    """
    layers = [
        m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))
    ]
    order = [p for m in layers for p in (m.weight, m.bias) if p is not None and p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    for module in layers:
        ok = isinstance(module, nn.Linear) or (
            isinstance(module, nn.Conv2d)
            and module.groups == 1
            and module.padding_mode == "zeros"
            and not isinstance(module.padding, str)
        )
        if not ok or not module.weight.requires_grad:
            raise NotImplementedError(f"jacobian_features: unsupported layer {module!r}")
    if [id(p) for p in order] != [id(p) for p in params]:
        raise NotImplementedError("jacobian_features: parameters not in layer order")
    parts: list[list[Block]] = []
    outputs: list[Tensor] = []
    for start in range(0, len(inputs), chunk):
        x = inputs[start : start + chunk]
        seen: list[tuple[Tensor, Tensor]] = []
        hooks = [
            m.register_forward_hook(
                lambda _m, args, out, seen=seen: seen.append((args[0].detach(), out))
            )
            for m in layers
        ]
        try:
            with torch.enable_grad():
                f = model(x)
                grads = [
                    torch.autograd.grad(
                        f[:, c].sum(), [o for _, o in seen], retain_graph=c < f.shape[1] - 1
                    )
                    for c in range(f.shape[1])
                ]
        finally:
            for hook in hooks:
                hook.remove()
        blocks: list[Block] = []
        for i, (module, (a, _)) in enumerate(zip(layers, seen)):
            g = torch.stack([grad[i] for grad in grads], 1)  # [N, C, out, ...]
            if isinstance(module, nn.Linear):
                if a.ndim != 2:
                    raise NotImplementedError("jacobian_features: Linear with >2-d input")
                blocks.append(OuterBlock(g, a))
                if module.bias is not None:
                    blocks.append(DenseBlock(g))
            else:
                unfolded = F.unfold(
                    a, module.kernel_size, module.dilation, module.padding, module.stride
                )  # [N, in·kh·kw, T]
                g = g.flatten(3)  # [N, C, out, T]
                blocks.append(DenseBlock(torch.einsum("ncot,ndt->ncod", g, unfolded).flatten(2)))
                if module.bias is not None:
                    blocks.append(DenseBlock(g.sum(-1)))
        parts.append(blocks)
        outputs.append(f.detach())
    return Features(torch.cat(outputs), _cat_blocks(parts))


class FunctionalVariance:
    """``diag(J P⁻¹ Jᵀ)`` (``[N, C]``) of a fitted Laplace posterior on one evaluation set.

    Read at the posterior's *current* prior precision on every call, so that a grid
    search only sets ``la.prior_precision`` and calls again. For the Kronecker methods
    the projections of the Jacobians on the eigenvectors are computed once (they do
    not depend on the prior precision or on ``σ``); the formula is laplace-torch's
    ``KronDecomposed.inv_square_form`` restricted to the diagonal.

    Args:
        la: A fitted ``KronLaplace`` (also ``KFOCLaplace``), ``DiagLaplace`` or
            ``FullLaplace`` over all weights.
        features: :func:`jacobian_features` of the evaluation inputs.
    """

    def __init__(self, la, features: Features):
        from laplace import DiagLaplace, FullLaplace, KronLaplace

        self.la, self.features = la, features
        self._projected: list[tuple[str, Tensor, Tensor | None]] | None = None
        if isinstance(la, KronLaplace):
            self.kind = "kron"
            self._project(la.posterior_precision)
        elif isinstance(la, DiagLaplace):
            self.kind = "diag"
        elif isinstance(la, FullLaplace):
            self.kind = "full"
            self._dense = torch.cat([b.dense() for b in features.blocks], 2)
        else:
            raise TypeError(f"FunctionalVariance: unsupported Laplace class {type(la).__name__}")

    def _project(self, precision) -> None:
        """Squared projections of each Jacobian block on the eigenvectors."""
        if len(precision.eigenvectors) != len(self.features.blocks):
            raise ValueError(
                f"posterior has {len(precision.eigenvectors)} blocks, the Jacobians "
                f"{len(self.features.blocks)}"
            )
        projected = []
        for Qs, block in zip(precision.eigenvectors, self.features.blocks):
            if len(Qs) == 2:
                Q1, Q2 = Qs
                if Q1.shape[0] * Q2.shape[0] != block.numel:
                    raise ValueError("posterior block and Jacobian block differ in size")
                if isinstance(block, OuterBlock):
                    u = (block.g @ Q1).square()  # [N, C, out]
                    v = (block.a @ Q2).square()  # [N, in]
                    projected.append(("outer", u, v))
                else:  # Q1ᵀ J Q2 as two large products, kept as [N, C, in, out]
                    N, C, _ = block.J.shape
                    out, inp = Q1.shape[0], Q2.shape[0]
                    JQ2 = (block.J.reshape(N * C * out, inp) @ Q2).reshape(N * C, out, inp)
                    Z = JQ2.transpose(1, 2).reshape(N * C * inp, out) @ Q1
                    projected.append(("dense2", Z.reshape(N, C, inp, out).square(), None))
            elif len(Qs) == 1:
                (Q,) = Qs
                if Q.shape[0] != block.numel:
                    raise ValueError("posterior block and Jacobian block differ in size")
                projected.append(("dense1", (block.dense() @ Q).square(), None))
            else:
                raise ValueError(f"Kronecker block with {len(Qs)} factors")
        self._projected = projected

    def __call__(self) -> Tensor:
        """``[N, C]`` functional variances at the current prior precision."""
        if self.kind == "kron":
            return self._kron(self.la.posterior_precision)
        if self.kind == "diag":
            return self._diag(self.la.posterior_variance)
        cov = self.la.posterior_covariance
        return torch.einsum("ncp,pq,ncq->nc", self._dense, cov, self._dense)

    def _kron(self, precision) -> Tensor:
        damping = getattr(precision, "damping", False)
        total = torch.zeros_like(self.features.f_mu)
        for (kind, u, v), ls, delta in zip(
            self._projected, precision.eigenvalues, precision.deltas
        ):
            if len(ls) == 2 or ls[0].ndim == 2:  # a weight: Kronecker or corrected
                if len(ls) == 1:  # eigenvalue-corrected: its own [out, in] eigenvalues
                    inv = 1 / (ls[0] + delta)
                elif damping:
                    inv = 1 / torch.outer(ls[0] + delta.sqrt(), ls[1] + delta.sqrt())
                else:
                    inv = 1 / (torch.outer(ls[0], ls[1]) + delta)
                if kind == "outer":
                    total += (u * (v @ inv.T).unsqueeze(1)).sum(-1)
                else:
                    total += (u * inv.T).sum((-2, -1))
            else:
                total += u @ (1 / (ls[0] + delta))
        return total

    def _diag(self, variance: Tensor) -> Tensor:
        total = torch.zeros_like(self.features.f_mu)
        start = 0
        for block in self.features.blocks:
            v = variance[start : start + block.numel]
            start += block.numel
            if isinstance(block, OuterBlock):
                V = v.reshape(block.g.shape[-1], block.a.shape[-1])
                total += (block.g.square() * (block.a.square() @ V.T).unsqueeze(1)).sum(-1)
            else:
                total += block.J.square() @ v
        return total


def predictive(
    task: str, f_mu: Tensor, f_var: Tensor | None, sigma: float | None = None
) -> tuple[Tensor, Tensor | None]:
    """Return the glm predictive from outputs and functional variances.

    Classification: ``log softmax(κ f)`` with the probit factor
    ``κ = 1 / sqrt(1 + π/8 · f_var)`` (laplace-torch's ``link_approx="probit"``),
    returned as ``(log_probs, None)``. Regression: ``(mean, variance)`` with variance
    ``f_var + σ²``. ``f_var = None`` is the MAP predictive (no posterior).
    """
    f_mu = f_mu.double()
    if task == "classification":
        if f_var is None:
            return torch.log_softmax(f_mu, 1), None
        kappa = 1 / torch.sqrt(1 + math.pi / 8 * f_var.double())
        return torch.log_softmax(kappa * f_mu, 1), None
    var = (
        torch.full_like(f_mu[:, 0], sigma**2) if f_var is None else f_var[:, 0].double() + sigma**2
    )
    return f_mu[:, 0], var


def check_against_laplace(la, model: nn.Module, task: str, inputs: Tensor, sigma) -> float:
    """Largest difference of our glm predictive to laplace-torch's on ``inputs``.

    Classification: absolute difference of the probit class probabilities. Regression:
    relative difference of the functional variances.
    """
    features = jacobian_features(model, inputs)
    ours = FunctionalVariance(la, features)()
    f_mu = features.f_mu
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if task == "classification":
            theirs = la(inputs, pred_type="glm", link_approx="probit")
            mine = predictive(task, f_mu, ours)[0].exp()
            return float((mine - theirs.double()).abs().max())
        _, f_var = la(inputs, pred_type="glm")
    f_var = f_var.reshape(len(inputs), -1)[:, :1].double()
    return float(((ours.double() - f_var).abs() / f_var.abs().clamp_min(1e-30)).max())
