r"""laplace-torch's own ``Kron`` tests, run against the K-FOC Laplace classes.

Runs the ``Kron``-related tests of a laplace-torch checkout (its ``tests/`` folder; the
PyPI distributions ship none) with ``KronLaplace`` and ``KronLLLaplace`` bound to
:class:`~kfoc_backpack.laplace.KFOCLaplace` and
:class:`~kfoc_backpack.laplace.KFOCLLLaplace`, and ``hessian_structure="kron"`` read as
``"kfoc"``, against the laplace-torch installed beside this package. Nothing of the
checkout is copied or edited: a pytest plugin binds the names while the test modules are
imported and restores laplace-torch's own afterwards (laplace-torch's ``KronLaplace``
refers to itself by name at run time).

The tests that cannot hold for K-FOC are marked strict ``xfail`` with the reason
(:data:`EXPECTED_FAILURES`): an unexpected failure, or one of them passing, fails the run.

Usage::

    git clone https://github.com/aleximmer/Laplace /tmp/Laplace   # any machine with git
    python integration/laplace_suite.py /tmp/Laplace               # or: tox -e laplace-suite

``notes/compat-findings.md`` §8 records a run (commit, counts, each left-out test).
"""

from __future__ import annotations

import argparse
import importlib.machinery
import os
import sys
import tempfile
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from kfoc_backpack.enums import Structure

FILES = (
    "tests/test_baselaplace.py",
    "tests/test_lllaplace.py",
    "tests/test_laplace.py",
    "tests/test_serialization.py",
    "tests/test_subset_params.py",
)
"""laplace-torch's test modules that exercise ``KronLaplace``/``KronLLLaplace``."""

SELECTION = "Kron or kron or kfoc"
"""``-k`` expression: the tests of those modules that run a Kronecker-factored Laplace."""

EXPECTED_FAILURES: dict[tuple[str, tuple[str, ...]], str] = {
    ("test_dict_data", ("BackPackGGN",)): (
        "asserts that laplace-torch's BackPACK backend refuses dict batches; "
        "hessian_structure='kfoc' replaces it by KFOCBackend, whose hook route fits them"
    ),
    ("test_dict_data", ("BackPackEF",)): (
        "asserts that laplace-torch's BackPACK backend refuses dict batches; "
        "hessian_structure='kfoc' replaces it by KFOCEFBackend, whose hook route fits them"
    ),
    ("test_incompatible_backend", ()): (
        "asserts that BackPACK/ASDL backends refuse a model with frozen parameters; "
        "hessian_structure='kfoc' replaces the backend and supports frozen parameters"
    ),
    ("test_overriding_fit", ()): (
        "reads the posterior precision as a matrix only where its type is exactly "
        "KronDecomposed, else calls .clone(); the posterior of every class here is a "
        "subclass (BlockDecomposed, over the typed blocks). The property (a refit "
        "overrides) is tested in tests/test_laplace_classes.py and "
        "tests/test_eigen_corrected_laplace.py"
    ),
    ("test_online_fit", ()): (
        "reads la.H as a matrix only where its type is exactly KronDecomposed, else calls "
        ".clone(); the posterior of every class here is a subclass (BlockDecomposed). "
        "Three online fits of the same data give 3·H for kfoc, kfac and ekfac, and for "
        "ekfoc up to the projection of the earlier S onto the refitted basis, see "
        "tests/test_laplace_classes.py and tests/test_eigen_corrected_laplace.py"
    ),
}
"""``(test function, substrings of its parameter id) → why it cannot hold for K-FOC``."""


def expected_failure(name: str, param_id: str) -> str | None:
    """Return why a test cannot hold for K-FOC, or ``None`` where it should pass."""
    for (function, parts), reason in EXPECTED_FAILURES.items():
        if name == function and all(part in param_id for part in parts):
            return reason
    return None


def is_kron(structure: object) -> bool:
    """Whether ``structure`` names laplace-torch's ``"kron"`` (a string or the enum member)."""
    return getattr(structure, "value", structure) == "kron"


STRUCTURES = Structure.values()
"""The structures the suite can stand in for ``"kron"``: every one the package registers."""


def kron_as(factory: Callable[..., Any], structure: str = "kfoc") -> Callable[..., Any]:
    """Wrap laplace-torch's ``Laplace`` factory: an explicit ``"kron"`` reads ``structure``.

    The factory's own default structure is left as it is.
    """

    def adapted(*args: Any, **kwargs: Any) -> Any:
        if len(args) > 3 and is_kron(args[3]):
            args = (*args[:3], structure, *args[4:])
        if is_kron(kwargs.get("hessian_structure")):
            kwargs["hessian_structure"] = structure
        return factory(*args, **kwargs)

    return adapted


def torchvision_stub() -> types.ModuleType:
    """Return a ``torchvision`` whose ``models.wide_resnet50_2`` skips its caller's test.

    Only installed where torchvision cannot be imported (the CPU torch build of this
    project's CI has none; laplace-torch's tests import it at module level).
    """

    def wide_resnet50_2(*args: Any, **kwargs: Any) -> Any:
        pytest.skip("torchvision is not installed beside this torch")

    package = types.ModuleType("torchvision")
    package.__spec__ = importlib.machinery.ModuleSpec("torchvision", None, is_package=True)
    package.__path__ = []
    models = types.ModuleType("torchvision.models")
    models.__spec__ = importlib.machinery.ModuleSpec("torchvision.models", None)
    models.wide_resnet50_2 = wide_resnet50_2  # type: ignore[attr-defined]
    package.models = models  # type: ignore[attr-defined]
    return package


class KFOCInPlaceOfKron:
    """pytest plugin: laplace-torch's ``Kron`` names mean the K-FOC classes in its tests.

    The names are bound while the test modules are imported (collection), so the tests'
    own globals and parametrisations hold the K-FOC classes, and laplace-torch's are
    restored before any test runs. Expected failures become strict ``xfail``.
    """

    def __init__(self, structure: str = "kfoc") -> None:
        self.structure = structure
        self._saved: list[tuple[object, str, object]] = []
        self._stubbed = False

    def _bind(self, owner: object, name: str, value: object) -> None:
        self._saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def _restore(self) -> None:
        while self._saved:
            owner, name, value = self._saved.pop()
            setattr(owner, name, value)

    def pytest_configure(self, config: pytest.Config) -> None:
        """Bind the K-FOC classes and the factory; stand in for a missing torchvision."""
        import laplace
        import laplace.baselaplace
        import laplace.laplace
        import laplace.lllaplace

        import kfoc_backpack.laplace as kfoc_laplace

        public = (getattr(kfoc_laplace, name) for name in kfoc_laplace.__all__)
        classes = {
            (cls._key[0], cls._key[1]): cls
            for cls in public
            if isinstance(cls, type) and getattr(cls, "_key", None)
        }
        for owner in (laplace, laplace.baselaplace):
            self._bind(owner, "KronLaplace", classes[("all", self.structure)])
        for owner in (laplace, laplace.lllaplace):
            self._bind(owner, "KronLLLaplace", classes[("last_layer", self.structure)])
        for owner in (laplace, laplace.laplace):
            self._bind(owner, "Laplace", kron_as(laplace.laplace.Laplace, self.structure))
        try:
            import torchvision.models  # noqa: F401
        except Exception:
            for name in [n for n in sys.modules if n.split(".")[0] == "torchvision"]:
                del sys.modules[name]
            stub = torchvision_stub()
            sys.modules["torchvision"] = stub
            sys.modules["torchvision.models"] = stub.models  # type: ignore[attr-defined]
            self._stubbed = True

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        """Restore laplace-torch's names; mark the expected failures strict ``xfail``."""
        self._restore()
        for item in items:
            name = getattr(item, "originalname", item.name)
            callspec = getattr(item, "callspec", None)
            reason = expected_failure(name, callspec.id if callspec is not None else "")
            if reason is not None:
                item.add_marker(pytest.mark.xfail(reason=reason, strict=True))

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        """Restore anything still bound and remove the torchvision stand-in."""
        self._restore()
        if self._stubbed:
            sys.modules.pop("torchvision.models", None)
            sys.modules.pop("torchvision", None)


def run(
    checkout: Path,
    files: Sequence[str] = FILES,
    extra: Sequence[str] = (),
    structure: str = "kfoc",
) -> int:
    """Run laplace-torch's ``Kron`` tests from ``checkout`` against the K-FOC classes.

    The checkout's ``tests`` folder is linked into a temporary directory, so that its
    ``laplace`` sources are not imported in place of the installed laplace-torch.

    Args:
        checkout: Root of a laplace-torch checkout (holding ``tests/``).
        files: Test modules, relative to the root.
        extra: More pytest arguments (e.g. ``-x``, another ``-k``).
        structure: The classes standing in for ``KronLaplace``/``KronLLLaplace``:
            ``"kfoc"``, or the eigenvalue-corrected ``"ekfoc"``/``"ekfac"``.

    Returns:
        pytest's exit code.
    """
    tests = checkout.resolve() / "tests"
    missing = [f for f in files if not (checkout / f).is_file()]
    if missing:
        raise SystemExit(f"{checkout} is not a laplace-torch checkout: no {', '.join(missing)}")
    with tempfile.TemporaryDirectory(prefix="laplace-suite-") as root:
        (Path(root) / "tests").symlink_to(tests, target_is_directory=True)
        here = os.getcwd()
        os.chdir(root)
        try:
            selection = f"{SELECTION} or {structure}"  # the parameter ids name the class
            args = [*files, "-k", selection, "-q", "-rfExX", "-p", "no:cacheprovider"]
            args += ["--rootdir", root, "-c", os.devnull, *extra]
            return int(pytest.main(args, plugins=[KFOCInPlaceOfKron(structure)]))
        finally:
            os.chdir(here)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python integration/laplace_suite.py CHECKOUT [pytest args]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkout", type=Path, help="root of a laplace-torch checkout")
    parser.add_argument(
        "--files", nargs="+", default=list(FILES), help="test modules (default: %(default)s)"
    )
    parser.add_argument(
        "--structure",
        choices=STRUCTURES,
        default="kfoc",
        help="the classes in place of KronLaplace/KronLLLaplace (default: %(default)s)",
    )
    args, extra = parser.parse_known_args(argv)
    return run(args.checkout, args.files, extra, args.structure)


if __name__ == "__main__":
    sys.exit(main())
