"""The one place for library-version facts: supported ranges and known differences.

Supported (what the tox matrix in ``tox.ini`` proves, every pair of these values):

==========================  ===================  ========================================
package                     range                tested
==========================  ===================  ========================================
``torch``                   ``>=2.13,<2.16``     2.13.0 (CPU build), 2.14.1, 2.15.0
``backpack-for-pytorch``    ``>=1.6,<1.8``       1.6.0, 1.7.1
``laplace-torch``           ``>=0.2.2.2,<0.4``   0.2.2.2, 0.2.3, 0.3
``curvlinops-for-pytorch``  by laplace-torch     2.0.1 with 0.2.2.x; 3.0.1 with 0.2.3/0.3
==========================  ===================  ========================================

:func:`check_versions` runs when ``kfoc_backpack`` is imported, *before* BackPACK or
laplace-torch are imported (laplace-torch 0.2.2.2 with curvlinops 3 fails inside its own
import), and raises :class:`ImportError` naming the package, the version found and the
supported range. Set ``KFOC_BACKPACK_SKIP_VERSION_CHECK=1`` to try other versions at
your own risk.

Known differences between the supported releases (details in
``notes/compat-findings.md``):

* backpack 1.6 vs 1.7: nothing K-FOC uses differs (``SqrtGGN``, its module extensions,
  ``unfold_input`` and the derivatives are identical); 1.6 imports ``pkg_resources``
  and so needs ``setuptools<82``.
* laplace-torch 0.2.x rejects backends whose class *name* contains ``"backpack"`` when
  parameters are frozen, 0.3 any ``BackPackInterface`` subclass: ``KFOCBackend``
  subclasses ``GGNInterface`` only and its name contains neither.
* In all three laplace-torch releases ``KronLLLaplace(damping=True)`` ends up
  undamped and ``KronDecomposed``'s ``*``/``+`` drop ``damping``; the K-FOC Laplace
  classes keep it.
* laplace-torch 0.2.2.x's ``LLLaplace.fit`` accepts ``progress_bar`` but does not pass
  it on; ``KFOCLLLaplace.fit`` carries it.
* ``Laplace()`` raises ``KeyError`` (0.2.x) or ``ValueError`` (0.3) for an unknown
  Hessian structure; 0.2.2.2's last-layer ``FeatureExtractor`` registers ``last_layer``
  twice in the state dict.
* Constructor keyword arguments of the curvature interfaces are the same in all three;
  :func:`supported_kwargs` still filters by signature, so a release that drops one
  fails loudly at our call rather than deep inside laplace-torch.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from packaging.version import Version

SKIP_ENV = "KFOC_BACKPACK_SKIP_VERSION_CHECK"

SUPPORTED: dict[str, tuple[str, str]] = {
    "torch": ("2.13", "2.16"),
    "backpack-for-pytorch": ("1.6", "1.8"),
    "laplace-torch": ("0.2.2.2", "0.4"),
}
"""Package → ``(lowest supported, first unsupported)`` release."""


def installed_version(package: str) -> Version | None:
    """Return the installed version of ``package`` (local labels such as ``+cpu`` dropped)."""
    try:
        return Version(Version(version(package)).base_version)
    except PackageNotFoundError:
        return None


def check_versions() -> None:
    """Raise :class:`ImportError` for library versions outside the supported ranges.

    Raises:
        ImportError: Naming the package, the version found and the supported range.
    """
    if os.environ.get(SKIP_ENV):
        return
    problems = []
    for package, (low, high) in SUPPORTED.items():
        found = installed_version(package)
        if found is None or not Version(low) <= found < Version(high):
            problems.append(f"{package} {found or 'not installed'} (supported: >={low},<{high})")
    laplace, curvlinops = (
        installed_version("laplace-torch"),
        installed_version("curvlinops-for-pytorch"),
    )
    if laplace is not None and curvlinops is not None:
        needs_v2 = laplace < Version("0.2.3")
        if needs_v2 and curvlinops >= Version("3"):
            problems.append(
                f"curvlinops-for-pytorch {curvlinops} with laplace-torch {laplace} "
                "(laplace-torch 0.2.2.x needs curvlinops-for-pytorch<3)"
            )
        if not needs_v2 and curvlinops < Version("3.0.1"):
            problems.append(
                f"curvlinops-for-pytorch {curvlinops} with laplace-torch {laplace} "
                "(laplace-torch>=0.2.3 needs curvlinops-for-pytorch>=3.0.1)"
            )
    if problems:
        raise ImportError(
            "kfoc_backpack does not support the installed "
            + "; ".join(problems)
            + f". Install supported versions, or set {SKIP_ENV}=1 to try anyway."
        )


def supported_kwargs(func: Callable[..., Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Return the items of ``kwargs`` that ``func`` accepts as keyword arguments."""
    params = inspect.signature(func).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(kwargs)
    return {key: value for key, value in kwargs.items() if key in params}
