"""Influence functions with any curvature of the package.

``g_testᵀ (B + λI)⁻¹ g_train`` — the first-order effect of a training input on a test
measurement — with ``B`` one of the package's curvatures (K-FOC, EK-FOC, EK-FAC, K-FAC,
laplace-torch's ``kron``, BackPACK's factors, the identity, or the exact dense GGN of a
small model):

* :mod:`~kfoc_backpack.influence.measure` — per-sample gradients of the training loss
  and of the test measurement (:class:`~kfoc_backpack.enums.Measurement`), one backward
  pass per batch;
* :mod:`~kfoc_backpack.influence.preconditioner` — ``(B + λ)⁻¹`` block by block, with
  kronfluence's damping heuristic (:class:`~kfoc_backpack.enums.Damping`);
* :mod:`~kfoc_backpack.influence.scores` — pairwise scores, self-influence and the
  preconditioned test gradients (:class:`Influence`).

``integration/influence.py`` measures how well each curvature attributes by the
linear datamodeling score.
"""

from kfoc_backpack.enums import Damping, Measurement
from kfoc_backpack.influence.preconditioner import Group, Preconditioner
from kfoc_backpack.influence.scores import Influence, exact_curvature

__all__ = [
    "Damping",
    "Group",
    "Influence",
    "Measurement",
    "Preconditioner",
    "exact_curvature",
]
