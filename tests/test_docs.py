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


# --------------------------------------------------------------------------------------
# One home for every measured number (issue 34): the reference JSON, rendered by the site
# --------------------------------------------------------------------------------------

#: The texts a person types numbers into: working notes, the README, the site's pages
#: (not the rendered snippets in ``docs/_generated``, the API pages or the gallery).
TYPED_PAGES = (
    sorted((ROOT / "notes").glob("*.md"))
    + [ROOT / "README.md"]
    + [
        p
        for p in sorted(DOCS.rglob("*.md"))
        if not {"_generated", "api", "auto_examples", "_build"} & set(p.relative_to(DOCS).parts)
    ]
)

#: A decimal number standing alone: not part of a version (``2.13.0``), a name
#: (``conv64``, ``v1.2``) or a longer number.
NUMBER = re.compile(r"(?<![\w.])\d+\.\d+(?:[eE][-+]?\d+)?(?![\w.]*\d)")

#: Text right before a number that makes it a version or a setting, not a measurement.
VERSION_CONTEXT = re.compile(
    r"(?:torch|Python|python|Sphinx|≥|>=|<=|<|>|==|~=|\")\s*(?:\d[\d.]*\s*[–-]\s*)?$"
)

#: Numbers in the typed pages that equal a measured number by coincidence: they measure
#: something else (a one-off diagnostic recorded only in that note, whose number has no
#: other home) or are no measurement at all. page -> {number: why}. An entry exempts
#: that number on that page only.
COINCIDENCES: dict[str, dict[str, str]] = {
    "docs/conventions.md": {"0.965": "the paper's own figure (§7), not ours"},
    "docs/getting_started.md": {"3.11": "a Python version"},
    "docs/user_guide/versions.md": {"3.11": "a Python version"},
    "notes/paper-results.md": {
        # The diagnostic runs of "Where we differ" (--with-bias, --epochs 0/1/30, the
        # paper's and a third scale split, --activation; no JSON holds them)
        **dict.fromkeys(
            "0.588 0.573 0.640 0.526 0.473 0.570 0.138 0.545 0.255 0.465 0.400 0.498 "
            "0.890 0.977 0.604 0.756 0.946 0.940 0.516 0.593 0.601 0.103 0.503 0.583 "
            "0.632".split(),
            "a diagnostic run recorded only in this note",
        ),
        "2.30": "the untrained model's training loss in the --epochs 0 diagnostic",
    },
    "notes/performance.md": {
        "0.941": "an eigenvalue ratio printed by integration/convergence.py (no JSON)",
        "2.96": "a one-off operation count (ratio) of an earlier route (dated history)",
        "1.25": "the 1.25× tolerance the analysis applies, not a measurement",
        "1.69": "peak memory before the buffer rewrite (dated history)",
        "1.54": "peak memory before the buffer rewrite (dated history)",
    },
    "notes/posterior-results.md": {
        "13.5": "the prior precision a log-determinant is evaluated at (a setting)",
        "0.343": "the --weight-decay 5e-4 diagnostic (seed 0; no JSON holds it)",
        "0.437": "the --weight-decay 5e-4 diagnostic (seed 0; no JSON holds it)",
        "79.5": "the thread diagnostic (seconds with 2 threads; no JSON holds it)",
        "12.4": "the thread diagnostic (a K-FAC fit with 2 threads; no JSON holds it)",
    },
}


def significant_digits(token: str) -> int:
    return len(token.lower().split("e")[0].replace(".", "").lstrip("0"))


def measured_tokens(reference: Path, out: Path) -> dict[str, set[str]]:
    """Every measured number as the site shows it or as the JSON stores it -> its sources.

    Shown: the numbers of 3 or more significant digits in the rendered snippets and
    ``{refvalue}`` values. Stored: each JSON float at full precision and in scientific
    form (3 and 4 significant digits), what a pasted raw value looks like. (Fixed-point
    roundings of every raw float are not used: ``posterior_results.json`` alone holds
    40,000 floats, which cover nearly every 3- or 4-digit decimal.)
    """
    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        import reference as extension

        snippets = extension.render_all(reference, out)
        values = {f"refvalue {k}": v(reference) for k, v in extension.VALUES.items()}
    finally:
        sys.path.remove(str(DOCS / "_ext"))
    tokens: dict[str, set[str]] = {}
    for name, snippet in {**snippets, **values}.items():
        for match in NUMBER.finditer(snippet):
            shown = match.group()
            forms = [shown]
            if "e" not in shown.lower() and float(shown) >= 1:
                # typed more coarsely: 1.572 s as 1.57 s (fractions below 1 are left at
                # their rendered precision: their coarser forms hit too many unrelated
                # 3-digit diagnostics)
                decimals = len(shown.split(".")[1])
                forms += [f"{float(shown):.{d}f}" for d in range(decimals)]
            for form in forms:
                if significant_digits(form) >= 3 and "." in form:
                    tokens.setdefault(form, set()).add(f"docs/_generated/{name}.md")

    def walk(node, file: str) -> None:
        if isinstance(node, dict):
            for value in node.values():
                walk(value, file)
        elif isinstance(node, list):
            for value in node:
                walk(value, file)
        elif isinstance(node, float) and node == node and abs(node) not in (0.0, float("inf")):
            forms = [repr(abs(node)), f"{abs(node):.2e}", f"{abs(node):.3e}"]
            for form in forms:
                if significant_digits(form) >= 4 or "e" in form:
                    tokens.setdefault(form, set()).add(file)

    for path in sorted(reference.glob("*.json")):
        walk(json.loads(path.read_text()), f"integration/reference/{path.name}")
    return tokens


def typed_duplicates(
    tokens: dict[str, set[str]], pages=TYPED_PAGES, root: Path = ROOT
) -> list[str]:
    """The typed numbers in ``pages`` that are measured numbers: ``page:line: ...``."""
    found = []
    for path in pages:
        page = str(path.relative_to(root))
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for match in NUMBER.finditer(line):
                token = match.group()
                if token not in tokens or token in COINCIDENCES.get(page, {}):
                    continue
                if VERSION_CONTEXT.search(line[: match.start()]):
                    continue
                sources = ", ".join(sorted(tokens[token]))
                found.append(f"{page}:{number}: {token} (in {sources}): {line.strip()}")
    return found


def test_no_measured_number_is_typed(tmp_path):
    """A measured number has one home, its reference JSON; pages point at the rendering.

    Notes, the README and the site's pages describe and point ("see the table on the
    posterior study page"); a number typed there goes stale when the JSON is re-measured.
    """
    tokens = measured_tokens(ROOT / "integration" / "reference", tmp_path / "generated")
    assert len(tokens) > 1000  # the snippets rendered
    found = typed_duplicates(tokens)
    assert not found, "\n".join(found)


def test_a_typed_measurement_is_caught(tmp_path):
    """The check above finds an LDS mean of the influence study pasted into a note."""
    reference = ROOT / "integration" / "reference"
    tokens = measured_tokens(reference, tmp_path / "generated")
    summary = json.loads((reference / "influence_cpu.json").read_text())["summary"]
    row = next(
        r
        for r in summary
        if r["problem"] == "concrete" and r["method"] == "ekfoc" and r["damping"] == 0.1
    )
    note = tmp_path / "notes" / "note.md"
    note.parent.mkdir()
    for typed in (f"{row['lds_mean']:.3f}", repr(row["lds_mean"]), f"{row['lds_mean']:.2e}"):
        note.write_text(f"EK-FOC's LDS on Concrete is {typed} (torch 2.14.1).\n")
        found = typed_duplicates(tokens, pages=[note], root=tmp_path)
        assert len(found) == 1 and typed in found[0], (typed, found)
