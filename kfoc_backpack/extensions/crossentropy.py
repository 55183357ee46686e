"""K-FOC's loss module extension for ``torch.nn.CrossEntropyLoss``: ``C − 1`` columns.

BackPACK's ``SqrtGGNCrossEntropyLoss`` starts the exact GGN's backward pass with the
``C`` columns of ``S = diag(√p) − p√pᵀ`` per input; they span ``C − 1`` dimensions
(``S √p = 0``). K-FOC's cost grows with the number of columns on every layer (the
per-sample matrices of ``KFOCExact`` are ``C·N``), so this extension mixes them
orthogonally into ``C − 1`` (:func:`~kfoc_backpack.collect.loss.drop_null_direction`):
the exact GGN, its per-sample blocks and K-FAC's factors of the same columns are
unchanged, and ``KFOCExact`` does ``(C − 1)/C`` of the work (half for two classes).
The hook route (:mod:`kfoc_backpack.collect.loss`) starts from the same ``C − 1``.

Only the exact strategy on ``[N, C]`` outputs is changed; Monte-Carlo columns and
outputs with extra dimensions (BackPACK spreads those over ``C·Π d`` columns) are
passed on as BackPACK computes them.

Index conventions (BackPACK's): ``V`` columns, ``N`` inputs, ``C`` classes.
"""

from __future__ import annotations

from backpack.extensions.secondorder.hbp import LossHessianStrategy
from backpack.extensions.secondorder.sqrt_ggn.losses import SqrtGGNCrossEntropyLoss
from torch import Tensor
from torch.nn import CrossEntropyLoss

from kfoc_backpack.collect.loss import drop_null_direction


class KFOCCrossEntropyLoss(SqrtGGNCrossEntropyLoss):
    """BackPACK's cross-entropy extension with ``C − 1`` exact columns on ``[N, C]`` outputs."""

    def backpropagate(
        self, ext, module: CrossEntropyLoss, grad_inp, grad_out, backproped: None
    ) -> Tensor:
        """BackPACK's ``[V, N, C]`` square root; exact and 2-d: ``[C − 1, N, C]``."""
        sqrt = super().backpropagate(ext, module, grad_inp, grad_out, backproped)
        if (
            ext.get_loss_hessian_strategy() != LossHessianStrategy.EXACT
            or ext.get_subsampling() is not None
            or sqrt.dim() != 3
            or sqrt.shape[0] < 2
        ):
            return sqrt
        root = module.input0.detach().to(sqrt.dtype).softmax(1).sqrt()  # [N, C]
        return drop_null_direction(sqrt, root)
