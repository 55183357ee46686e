"""The package as a user imports it: solver without the stack, exported names, README code."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BLOCK_STACK = textwrap.dedent(
    """
    import sys

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("backpack", "laplace", "curvlinops", "asdl"):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)")
            return None

    sys.meta_path.insert(0, Block())
    """
)


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_solver_imports_with_only_torch():
    code = BLOCK_STACK + textwrap.dedent(
        """
        import torch
        from kfoc_backpack.solver import FactoredTerms, nearest_kronecker_samples
        factors = nearest_kronecker_samples(torch.randn(4, 3, 2, dtype=torch.float64))
        assert factors.left.shape == (3, 3) and factors.right.shape == (2, 2)
        assert "backpack" not in sys.modules and "laplace" not in sys.modules
        import kfoc_backpack
        try:
            kfoc_backpack.KFOC
        except ImportError as error:
            assert "backpack-for-pytorch" in str(error) and "solver" in str(error)
        else:
            raise AssertionError("kfoc_backpack.KFOC without BackPACK")
        print("ok")
        """
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def readme_names() -> set[str]:
    text = (ROOT / "README.md").read_text()
    return set(re.findall(r"from kfoc_backpack import ([\w, ]+)", text))


def test_names_the_readme_imports_are_exported():
    import kfoc_backpack

    names = {n.strip() for group in readme_names() for n in group.split(",")}
    assert names, "the README imports names from kfoc_backpack"
    for name in names:
        assert name in kfoc_backpack.__all__ and hasattr(kfoc_backpack, name), name


def python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_blocks_run(index):
    """Every ```python block of the README runs as written, in a fresh interpreter."""
    result = run_python(
        "import warnings\nwarnings.filterwarnings('ignore')\n" + python_blocks()[index]
    )
    assert result.returncode == 0, result.stderr[-3000:]
