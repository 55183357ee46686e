r"""Output-side vectors of the three curvature targets.

Every target is ``F = Σ_{n,m} J_nᵀ v_{m,n} v_{m,n}ᵀ J_n`` with ``J_n`` the Jacobian of
the model output of input ``n``; backpropagating ``v_{m,n}`` to a layer's output gives
that layer's per-sample quantities. For the loss as reduced by ``lossfunc``:

* ``"ggn"`` — the exact generalised Gauss-Newton matrix: ``v_{m,n}`` are the columns
  of the square root of the loss Hessian with respect to the output (``C`` per
  output row for cross-entropy, one per output entry for MSE);
* ``"mc"`` — the Monte-Carlo Fisher: ``v_{m,n} = ∇_f ℓ(f_n, ŷ_{m,n}) / √S`` with
  ``S`` labels ``ŷ`` drawn from the model's predictive (torch's global generator);
* ``"ef"`` — the empirical Fisher: ``v_n = ∇_f ℓ(f_n, y_n)`` at the true label.

``reduction="mean"`` scales every ``v`` by ``1/√R`` (``R`` the number of terms the loss
averages), so each target is on the scale of the mean loss; laplace-torch uses
``reduction="sum"``. Classification outputs have the class dimension last
(``[N, *, C]``, targets ``[N, *]``), as laplace-torch flattens them.

Index conventions: ``M`` vectors per input, ``N`` inputs, ``R`` output rows per input
(tokens; 1 for ``[N, C]`` outputs), ``C`` classes or output features.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, Module, MSELoss

from kfoc_backpack.enums import Curvature

LOSSES = (MSELoss, CrossEntropyLoss, BCEWithLogitsLoss)


def check_loss(lossfunc: Module, owner: str = "K-FOC") -> str:
    """Return the loss's reduction if the loss is supported.

    Raises:
        NotImplementedError: For another loss or option.
    """
    if type(lossfunc) not in LOSSES:
        names = ", ".join(loss.__name__ for loss in LOSSES)
        raise NotImplementedError(f"{owner}: loss {type(lossfunc).__name__}; supported: {names}.")
    reduction = getattr(lossfunc, "reduction", None)
    if reduction not in ("mean", "sum"):
        raise NotImplementedError(
            f"{owner}: {type(lossfunc).__name__}(reduction={reduction!r}); supported "
            "reductions: 'mean', 'sum'."
        )
    if isinstance(lossfunc, CrossEntropyLoss) and (
        lossfunc.weight is not None or lossfunc.label_smoothing != 0
    ):
        raise NotImplementedError(
            f"{owner}: CrossEntropyLoss with class weights or label smoothing is not supported."
        )
    if isinstance(lossfunc, BCEWithLogitsLoss) and (
        lossfunc.weight is not None or lossfunc.pos_weight is not None
    ):
        raise NotImplementedError(
            f"{owner}: BCEWithLogitsLoss with weight or pos_weight is not supported."
        )
    return reduction


def loss_value(lossfunc: Module, output: Tensor, target: Tensor) -> Tensor:
    """Evaluate the loss, with classification outputs ``[N, *, C]`` flattened to rows."""
    if isinstance(lossfunc, CrossEntropyLoss):
        return lossfunc(output.reshape(-1, output.shape[-1]), target.reshape(-1))
    return lossfunc(output, target.reshape(output.shape).to(output.dtype))


def output_vectors(
    lossfunc: Module,
    output: Tensor,
    target: Tensor,
    curvature: Curvature | str,
    mc_samples: int = 1,
) -> Tensor:
    """Return the vectors ``v`` whose backpropagation gives the per-sample quantities.

    Args:
        lossfunc: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``.
        output: ``[N, *]`` model output (detached or not).
        target: Targets (class indices for cross-entropy; the true labels are only
            used by ``"ef"``).
        curvature: The target (:class:`~kfoc_backpack.enums.Curvature` or its value).
        mc_samples: Labels drawn per input for ``"mc"``.

    Returns:
        ``[M, *output.shape]``; ``M`` is ``R·C`` (cross-entropy) or the number of
        output entries per input (MSE, BCE) for ``"ggn"``, ``mc_samples`` for
        ``"mc"`` and one for ``"ef"``.
    """
    curvature = Curvature.parse(curvature, "curvature")
    f = output.detach()
    num = f.shape[0]
    reduction = check_loss(lossfunc)
    if isinstance(lossfunc, CrossEntropyLoss):
        vectors = _cross_entropy(f, target, curvature, mc_samples)
        terms = f.numel() // f.shape[-1]
    elif isinstance(lossfunc, MSELoss):
        vectors = _mse(f, target, curvature, mc_samples)
        terms = f.numel()
    else:
        vectors = _bce(f, target, curvature, mc_samples)
        terms = f.numel()
    if reduction == "mean":
        vectors = vectors / math.sqrt(terms)
    assert vectors.shape[1] == num
    return vectors


def _per_entry(scale: Tensor) -> Tensor:
    """``[P, N, *]`` vectors ``scale·e_p`` (one per output entry ``p`` of an input)."""
    num = scale.shape[0]
    flat = scale.reshape(num, -1)
    entries = flat.shape[1]
    eye = torch.eye(entries, dtype=flat.dtype, device=flat.device)
    return (eye.unsqueeze(1) * flat.unsqueeze(0)).reshape(entries, *scale.shape)


def _cross_entropy(f: Tensor, target: Tensor, curvature: Curvature, mc_samples: int) -> Tensor:
    classes = f.shape[-1]
    rows = f.reshape(f.shape[0], -1, classes)  # [N, R, C]
    probs = rows.softmax(-1)
    if curvature is Curvature.GGN:
        num, num_rows, _ = rows.shape
        cols = _cross_entropy_sqrt(probs)  # [C − 1, N, R, C]
        row_eye = torch.eye(num_rows, dtype=f.dtype, device=f.device)
        vecs = torch.einsum("cnrd,rs->rcnsd", cols, row_eye)  # [R, C − 1, N, R, C]
        return vecs.reshape(num_rows * (classes - 1), *f.shape)
    if curvature is Curvature.MC:
        flat = probs.reshape(-1, classes)
        labels = torch.multinomial(flat, mc_samples, replacement=True).T  # [S, N·R]
        onehot = torch.nn.functional.one_hot(labels, classes).to(f.dtype)
        grads = (flat.unsqueeze(0) - onehot) / math.sqrt(mc_samples)
        return grads.reshape(mc_samples, *f.shape)
    onehot = torch.nn.functional.one_hot(target.reshape(-1).long(), classes).to(f.dtype)
    return (probs.reshape(-1, classes) - onehot).reshape(1, *f.shape)


def _cross_entropy_sqrt(probs: Tensor) -> Tensor:
    """``C − 1`` vectors ``s_c`` per row with ``Σ_c s_c s_cᵀ = diag(p) − ppᵀ``.

    The columns ``√p_c (e_c − p)`` of ``S = diag(√p) − p√pᵀ``, less their null direction
    (:func:`drop_null_direction`).

    Args:
        probs: ``[..., C]`` softmax probabilities.

    Returns:
        ``[C − 1, ..., C]``: the vectors, first dimension.
    """
    classes = probs.shape[-1]
    root = probs.sqrt()
    eye = torch.eye(classes, dtype=probs.dtype, device=probs.device)
    cols = root.unsqueeze(-1) * (eye - probs.unsqueeze(-2))  # [..., C (vectors), C]
    return drop_null_direction(cols.movedim(-2, 0), root)


def drop_null_direction(cols: Tensor, root: Tensor) -> Tensor:
    """Cross-entropy's ``C`` Hessian-root vectors per row as ``C − 1`` with the same sum.

    The vectors ``s_v = √p_v (e_v − p)`` (BackPACK's ``sqrt_hessian`` has the same,
    scaled by the reduction) satisfy ``Σ_v √p_v s_v = p (1 − Σ_v p_v) = 0``: they span at
    most ``C − 1`` dimensions. The Householder reflection ``H = I − w wᵀ/(1 + √p_1)``,
    ``w = √p + e_1``, maps ``√p`` to ``−e_1`` and mixes the vectors orthogonally
    (``Σ_v s_v s_vᵀ`` unchanged), so that the first mixed vector is ``−Σ_v √p_v s_v = 0``
    and the other ``C − 1``, ``s_v − √p_v s_1 / (1 + √p_1)``, carry the whole Hessian:
    one backward vector fewer per output row (half of them for binary problems), and
    every per-sample block ``Σ_v x_v x_vᵀ`` of the exact GGN is unchanged. The term
    ``Σ_u √p_u s_u`` of ``wᵀS`` is zero up to the round-off of ``Σ p = 1`` and left out;
    ``1 + √p_1 ≥ 1``, so no probabilities need care.

    Args:
        cols: ``[C, ..., C]`` the vectors ``s_v`` along the first dimension (any common
            scale).
        root: ``[..., C]`` square roots ``√p`` of the softmax probabilities.

    Returns:
        ``[C − 1, ..., C]``: the mixed vectors ``v = 2 … C``.
    """
    coef = cols[0] / (1 + root[..., :1])  # wᵀS / (1 + √p_1), [..., C]
    return cols[1:] - root[..., 1:].movedim(-1, 0).unsqueeze(-1) * coef


def _mse(f: Tensor, target: Tensor, curvature: Curvature, mc_samples: int) -> Tensor:
    if curvature is Curvature.GGN:  # Hessian 2·I
        return _per_entry(torch.full_like(f, math.sqrt(2.0)))
    if curvature is Curvature.MC:  # ∇ of (f − ŷ)² at ŷ ~ N(f, 1/2): −√2·ε
        return math.sqrt(2.0 / mc_samples) * torch.randn(mc_samples, *f.shape, dtype=f.dtype).to(
            f.device
        )
    return (2 * (f - target.reshape(f.shape).to(f.dtype))).unsqueeze(0)


def _bce(f: Tensor, target: Tensor, curvature: Curvature, mc_samples: int) -> Tensor:
    probs = torch.sigmoid(f)
    if curvature is Curvature.GGN:  # Hessian diag(p(1 − p))
        return _per_entry((probs * (1 - probs)).sqrt())
    if curvature is Curvature.MC:
        draws = torch.bernoulli(probs.unsqueeze(0).expand(mc_samples, *f.shape))
        return (probs.unsqueeze(0) - draws) / math.sqrt(mc_samples)
    return (probs - target.reshape(f.shape).to(f.dtype)).unsqueeze(0)
