"""K-FOC module extension for ``torch.nn.Linear``.

Index conventions (BackPACK's): ``M`` columns per input (Monte-Carlo samples or
classes), ``N`` inputs, ``T`` positions, ``out``/``in`` the layer's features.
"""

from __future__ import annotations

from backpack.core.derivatives.linear import LinearDerivatives

from kfoc_backpack.collect.kinds.linear import LinearKind
from kfoc_backpack.extensions.base import KFOCBaseModule


class KFOCLinear(KFOCBaseModule):
    """K-FOC factors of a ``Linear`` layer's weight (``[L_out, R_in]``) and bias.

    BackPACK's derivatives of ``Linear``; the per-sample quantities are
    :class:`~kfoc_backpack.collect.kinds.linear.LinearKind`'s, as on the hook route:

    * 2-d input ``[N, in]``: per-sample weight gradients ``X_{m,n} = s_{m,n} a_nᵀ``
      are rank one; the solve runs in ``N``-dimensional coefficient space
      (:func:`~kfoc_backpack.solver.nearest_kronecker_outer`) and never allocates
      anything of size ``N·out·in``.
    * input with extra dimensions ``[N, *, in]`` (shared weight, like a
      convolution): ``X_{m,n} = Σ_t s_{m,n,t} a_{n,t}ᵀ``, handed over as every
      weight-shared layer is (:func:`~kfoc_backpack.collect.handover.weight_terms`:
      rank one for a single position, else the route the cost model picks).
    """

    def __init__(self):
        super().__init__(LinearDerivatives(), LinearKind())
