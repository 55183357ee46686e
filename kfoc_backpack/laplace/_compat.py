"""The one place for laplace-torch version differences (0.2.2.x, 0.2.3, 0.3).

Differences noticed so far:

* ``CurvatureInterface``/``GGNInterface.__init__`` grew keyword arguments over the
  releases (``subnetwork_indices``, ``dict_key_x``/``dict_key_y``, ``num_samples``);
  :func:`supported_kwargs` passes on only those the installed release accepts.
* 0.3 rejects backends that subclass ``BackPackInterface`` when some parameters are
  frozen (older releases test the class *name* for ``"backpack"``), and switches
  behaviour on names containing ``"backpack"``/``"asdl"``. ``KFOCBackend`` therefore
  subclasses ``GGNInterface`` only and its name contains neither.
* ``KronLLLaplace(damping=True)`` drops ``damping`` (``LLLaplace.__init__`` re-runs
  ``KronLaplace.__init__`` with its default); ``KFOCLLLaplace`` sets it afterwards.
* In 0.3 ``KronDecomposed.__mul__``/``__add__`` drop ``damping``, so
  ``KronLaplace(damping=True)`` is undamped; ``KFOCLaplace.posterior_precision``
  re-attaches the flag.
* ``LLLaplace.prior_precision_diag`` rejects per-layer priors that ``KronLaplace``'s
  setter accepts; ``KFOCLLLaplace`` expands them.
* ``Kron.init_from_model`` accepts at most 4-d weights; ``KFOCLaplace`` builds its own
  zero factors (``Conv3d`` weights are 5-d).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any


def laplace_version() -> str:
    """Return the installed laplace-torch version (``"unknown"`` if not found)."""
    try:
        return version("laplace-torch")
    except PackageNotFoundError:  # pragma: no cover - source checkouts
        return "unknown"


def supported_kwargs(func: Callable[..., Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Return the items of ``kwargs`` that ``func`` accepts as keyword arguments."""
    params = inspect.signature(func).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(kwargs)
    return {key: value for key, value in kwargs.items() if key in params}
