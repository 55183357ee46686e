"""The documentation site: the fast build (no gallery run) passes with warnings as errors.

A docstring that no longer parses, a cross-reference that does not resolve, or a page
that links to a missing target fails here, in the default test run (what ``.ci/run``
executes). The measured numbers the pages show are rendered from
``integration/reference/*.json``; a modified copy of a JSON changes the rendered page.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

pytest.importorskip("sphinx", reason="the docs tools need Python >= 3.11 (test extra)")
pytest.importorskip("sphinx_gallery")
pytest.importorskip("myst_parser")


def sphinx_build(
    out: Path, doctrees: Path, *options: str, pages: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """Run the fast build (gallery examples rendered, not executed), warnings as errors.

    ``pages``: write only these source files (the environment is updated as a whole).
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]
    command += ["-D", "plot_gallery=0", "-d", str(doctrees), *options, str(DOCS), str(out)]
    command += [str(DOCS / page) for page in pages]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """The fast build of the site: (html directory, doctree directory)."""
    base = tmp_path_factory.mktemp("docs")
    out, doctrees = base / "html", base / "doctrees"
    result = sphinx_build(out, doctrees)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    return out, doctrees


def text(html: Path) -> str:
    """The visible text of a page, whitespace collapsed."""
    page = re.sub(r"<[^>]+>", " ", html.read_text())
    return re.sub(r"\s+", " ", page)


def test_fast_build_has_no_warnings(built):
    out, _ = built
    assert (out / "index.html").exists()
    assert (out / "api.html").exists()


def test_every_public_name_has_an_entry(built):
    import kfoc_backpack

    out, _ = built
    pages = "".join(p.read_text() for p in (out / "api").glob("*.html"))
    for name in kfoc_backpack.__all__:
        if name.startswith("__"):
            continue
        obj = getattr(kfoc_backpack, name)
        anchors = {f'id="{obj.__module__}.{obj.__qualname__}"'}
        anchors |= {f'id="{p}.{name}"' for p in ("kfoc_backpack", "kfoc_backpack.solver")}
        assert any(a in pages for a in anchors), name


def test_gallery_pages_exist(built):
    out, _ = built
    examples = sorted((DOCS / "examples").glob("plot_*.py"))
    assert examples
    for example in examples:
        assert (out / "auto_examples" / f"{example.stem}.html").exists(), example.name


def test_a_json_change_changes_the_rendered_page(built, tmp_path):
    """Render the site from a modified copy of one reference JSON: the page follows."""
    out, doctrees = built
    reference = tmp_path / "reference"
    shutil.copytree(ROOT / "integration" / "reference", reference)
    path = reference / "benchmark_cpu.json"
    records = json.loads(path.read_text())
    record = next(r for r in records if r["model"] == "lenet5" and r["method"] == "KFOC")
    before = f"{record['median_ms']:.1f}"
    record["median_ms"] = 98765.4
    path.write_text(json.dumps(records))
    page = "user_guide/performance.html"
    assert before in text(out / page)
    assert "98765.4" not in text(out / page)
    out2 = tmp_path / "html"
    shutil.copytree(out, out2)  # the built site (and its search index); rewrite one page
    try:
        result = sphinx_build(
            out2,
            doctrees,
            "-D",
            f"kfoc_reference_dir={reference}",
            pages=("user_guide/performance.md",),
        )
        assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
        assert "98765.4" in text(out2 / page)
    finally:  # the snippets of the committed JSON again
        sys.path.insert(0, str(DOCS / "_ext"))
        try:
            import reference as extension

            extension.render_all(ROOT / "integration" / "reference")
        finally:
            sys.path.remove(str(DOCS / "_ext"))


def test_readme_is_short_and_starts_with_the_decision():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200
    first_screen = "\n".join(lines[:60]).lower()
    assert "which curvature" in first_screen
    assert "tox -e docs" in "\n".join(lines)


def test_docstrings_state_no_timings():
    """Docstrings say what code does and its limits; measured times live in the JSON."""
    timing = re.compile(r"\b\d+(\.\d+)?\s?(ms|s|seconds|GiB/s)\b|\b\d+(\.\d+)?×\s?K-FAC")
    found = []
    for path in (ROOT / "kfoc_backpack").rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if timing.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)
