"""K-FOC: Kronecker-factored optimal curvature for BackPACK and laplace-torch.

Layers (dependencies point down the list only):

1. :mod:`kfoc_backpack.solver` — nearest-Kronecker solvers on plain tensors;
2. :mod:`kfoc_backpack.extensions` — BackPACK extensions ``KFOC``, ``KFOCExact``;
3. :mod:`kfoc_backpack.laplace` — laplace-torch backend and Laplace classes.
"""

from kfoc_backpack._compat import check_versions

check_versions()  # before BackPACK / laplace-torch are imported

from kfoc_backpack.extensions import (  # noqa: E402
    KFOC,
    KFOCAccumulator,
    KFOCExact,
    optimal_factors,
)
from kfoc_backpack.laplace import KFOCBackend, KFOCLaplace, KFOCLLLaplace  # noqa: E402
from kfoc_backpack.solver import KroneckerFactors, SolverOptions  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "KFOC",
    "KFOCAccumulator",
    "KFOCBackend",
    "KFOCExact",
    "KFOCLLLaplace",
    "KFOCLaplace",
    "KroneckerFactors",
    "SolverOptions",
    "__version__",
    "optimal_factors",
]
