"""laplace-torch integration: the curvature backends and the registered Laplace classes.

Importing this package (``import kfoc_backpack`` does) registers with laplace-torch's
``Laplace`` every class of :mod:`~kfoc_backpack.laplace.classes` — one per approximation
of :mod:`kfoc_backpack.dataset` (``hessian_structure="kfoc"``, ``"ekfoc"``, ``"ekfac"``)
for ``subset_of_weights="all"`` and ``"last_layer"``.

* :mod:`~kfoc_backpack.laplace.backend` — ``KFOCBackend``/``KFOCEFBackend``: the hook
  route's collection as laplace-torch curvature backends;
* :mod:`~kfoc_backpack.laplace.base` — ``BlockLaplace``, what every class shares: one
  constructor, the fit over one data pass, state dicts;
* :mod:`~kfoc_backpack.laplace.posterior` — laplace-torch's ``Kron``/``KronDecomposed``
  interface over the typed blocks;
* :mod:`~kfoc_backpack.laplace.classes` — the registered classes.
"""

from kfoc_backpack.laplace import classes
from kfoc_backpack.laplace.backend import KFOCBackend, KFOCEFBackend, check_supported_layers
from kfoc_backpack.laplace.base import BlockLaplace
from kfoc_backpack.laplace.classes import *  # noqa: F403 - every registered class, by its __all__
from kfoc_backpack.laplace.errors import BatchKeyError, UnsupportedDtypeError
from kfoc_backpack.laplace.posterior import BlockDecomposed, BlockKron

__all__ = [
    "BatchKeyError",
    "BlockDecomposed",
    "BlockKron",
    "BlockLaplace",
    "KFOCBackend",
    "KFOCEFBackend",
    "UnsupportedDtypeError",
    "check_supported_layers",
    *classes.__all__,
]
