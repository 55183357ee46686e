"""What ``integration/`` may use of the package: the public API, through one import mechanism.

The experiments are the package's first users: they import only names a package lists
in its ``__all__`` (``kfoc_backpack`` and its public subpackages), and import each other
by module name — the script's folder is on ``sys.path`` when it runs, and pytest adds it
for the tests (``pyproject.toml``) — never by patching ``sys.path``.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

INTEGRATION = Path(__file__).resolve().parents[1] / "integration"
SCRIPTS = sorted(INTEGRATION.rglob("*.py"))
PUBLIC = {
    "kfoc_backpack",
    "kfoc_backpack.blocks",
    "kfoc_backpack.collect",
    "kfoc_backpack.dataset",
    "kfoc_backpack.enums",
    "kfoc_backpack.extensions",
    "kfoc_backpack.influence",
    "kfoc_backpack.laplace",
    "kfoc_backpack.solver",
}


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every import of the package in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kfoc_backpack"):
            found.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("kfoc_backpack")]
    return found


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(INTEGRATION)))
def test_integration_uses_the_public_api(path):
    for module, names in imports(path):
        assert module in PUBLIC, f"{path.name} imports {module}, not a public package"
        public = set(getattr(importlib.import_module(module), "__all__", ()))
        private = [name for name in names if name not in public]
        assert not private, f"{path.name} imports {private} from {module}, not in its __all__"


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(INTEGRATION)))
def test_integration_imports_its_modules_by_name(path):
    source = path.read_text()
    assert "sys.path" not in source and "from integration" not in source, path.name


def test_public_names_exist():
    for module in PUBLIC:
        package = importlib.import_module(module)
        missing = [name for name in getattr(package, "__all__", ()) if not hasattr(package, name)]
        assert not missing, (module, missing)
