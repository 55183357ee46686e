"""K-FOC: Kronecker-factored optimal curvature for BackPACK and laplace-torch.

Layers (dependencies point down the list only):

1. :mod:`kfoc_backpack.solver` — nearest-Kronecker solvers on plain tensors (needs
   only ``torch``); :mod:`kfoc_backpack.blocks` — the typed curvature blocks;
2. :mod:`kfoc_backpack.collect` — per-sample quantities of ``Linear``/``Conv`` layers
   (the hook route, and the per-layer maths shared with BackPACK's route);
   :mod:`kfoc_backpack.extensions` — BackPACK extensions ``KFOC``, ``KFOCExact``;
3. :mod:`kfoc_backpack.dataset` — the approximations, fitted by passes over a data set
   and over ``torch.distributed`` ranks (``KFOCAccumulator``, ``optimal_factors``);
4. :mod:`kfoc_backpack.laplace` — laplace-torch backends and Laplace classes;
   :mod:`kfoc_backpack.influence` — influence scores with any of these curvatures.

``import kfoc_backpack`` checks the library versions and registers
``hessian_structure="kfoc"`` (and its siblings) with laplace-torch. Options are the
``str, Enum`` s of :mod:`kfoc_backpack.enums`. Without BackPACK and laplace-torch
installed only :mod:`kfoc_backpack.solver` can be used; the other names then raise an
``ImportError`` saying what is missing.
"""

from importlib.util import find_spec


def _missing_stack() -> list[str]:
    """Distributions of the BackPACK/laplace-torch stack that cannot be imported."""
    missing = []
    for module, package in (("backpack", "backpack-for-pytorch"), ("laplace", "laplace-torch")):
        try:
            found = find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(package)
    return missing


_MISSING = _missing_stack()

if not _MISSING:
    from kfoc_backpack._compat import check_versions

    check_versions()  # before BackPACK / laplace-torch are imported

    from kfoc_backpack.collect.registry import freeze_unsupported, unsupported_parameters
    from kfoc_backpack.dataset import (
        DistributedFitError,
        KFOCAccumulator,
        eigenvalue_correction,
        optimal_factors,
    )
    from kfoc_backpack.extensions import EKFOC, KFOC, EKFOCExact, KFOCExact, KFOCTerms
    from kfoc_backpack.influence import Influence, Preconditioner
    from kfoc_backpack.laplace import KFOCBackend, KFOCEFBackend
    from kfoc_backpack.laplace.classes import *  # noqa: F403 - every registered Laplace class
    from kfoc_backpack.laplace.classes import __all__ as _LAPLACE_CLASSES
else:
    _LAPLACE_CLASSES = []

    def __getattr__(name: str):
        """Explain that everything but the solver needs BackPACK and laplace-torch."""
        if name.startswith("__"):
            raise AttributeError(name)
        raise ImportError(
            f"kfoc_backpack.{name} needs {' and '.join(_MISSING)}, which cannot be "
            "imported here; without them only kfoc_backpack.solver is available."
        )


from kfoc_backpack.enums import (  # noqa: E402
    Aggregation,
    Curvature,
    Damping,
    DiagonalRoute,
    Grouped,
    Measurement,
    Reduction,
    Route,
    Stop,
    Structure,
)
from kfoc_backpack.solver import KroneckerFactors, SolverOptions  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "EKFOC",
    "KFOC",
    "Aggregation",
    "Curvature",
    "Damping",
    "DiagonalRoute",
    "EKFOCExact",
    "DistributedFitError",
    "KFOCAccumulator",
    "KFOCBackend",
    "KFOCEFBackend",
    "KFOCExact",
    "KFOCTerms",
    "Grouped",
    "Influence",
    "Measurement",
    "Preconditioner",
    "Reduction",
    "Route",
    "Stop",
    "Structure",
    "KroneckerFactors",
    "SolverOptions",
    "__version__",
    "eigenvalue_correction",
    "freeze_unsupported",
    "optimal_factors",
    "unsupported_parameters",
    *_LAPLACE_CLASSES,
]
