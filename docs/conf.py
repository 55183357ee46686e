"""Sphinx configuration of the kfoc-backpack documentation.

Build: ``tox -e docs`` (the full site, every gallery example executed) or
``sphinx-build -W --keep-going -D plot_gallery=0 docs docs/_build/html`` (the fast build
the test suite runs: examples rendered, not executed). Every measured number the pages
show is rendered from ``integration/reference/*.json`` by ``_ext/reference.py``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE / "_ext"))
sys.path.insert(0, str(ROOT / "integration"))  # the gallery imports the scripts by name
os.environ.setdefault("KFOC_DOCS_BUILD", "1")

import kfoc_backpack  # noqa: E402

project = "kfoc-backpack"
author = "kfoc-backpack developers"
copyright = "2026, kfoc-backpack developers"  # noqa: A001
release = kfoc_backpack.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
    "reference",
    "apiref",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_generated", "**/GALLERY_HEADER.rst"]
templates_path = ["_templates"]

# MyST: Markdown pages with directives, roles and anchors for every heading.
myst_enable_extensions = ["colon_fence", "deflist", "dollarmath"]
myst_heading_anchors = 4

# API reference: every public module, recursively (subpackages added later appear on
# their own); Google-style docstrings.
autosummary_generate = True
autosummary_ignore_module_all = True  # a module's page documents what it defines
autosummary_imported_members = False
autodoc_default_options = {"members": True, "ignore-module-all": True, "show-inheritance": True}
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True  # "Attributes:" as fields: NamedTuple fields are documented once


def _public_names() -> None:
    """Write ``_generated/public_names.rst``: every name of ``kfoc_backpack.__all__``.

    Each links to the page of the module that defines it (the canonical entry), so a name
    added to ``__all__`` appears here without editing the docs.
    """
    import inspect

    lines = [".. list-table::", "   :header-rows: 1", "   :widths: 30 70", ""]
    lines += ["   * - name", "     - what it is"]
    for name in sorted(kfoc_backpack.__all__, key=str.lower):
        if name.startswith("__"):
            continue
        obj = getattr(kfoc_backpack, name)
        module = getattr(obj, "__module__", "kfoc_backpack")
        role = "class" if inspect.isclass(obj) else "func"
        if inspect.isclass(obj) and issubclass(obj, BaseException):
            role = "exc"
        summary = (inspect.getdoc(obj) or "").split("\n\n")[0].replace("\n", " ")
        summary = summary.split(". ")[0].rstrip(".") + "."
        lines += [f"   * - :py:{role}:`{name} <{module}.{obj.__qualname__}>`", f"     - {summary}"]
    out = HERE / "_generated"
    out.mkdir(exist_ok=True)
    text = "\n".join(lines) + "\n"
    path = out / "public_names.rst"
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


_public_names()

from apiref import private_exports  # noqa: E402

# Public names defined in a private module are documented on their package's page.
autosummary_context = {"private_exports": private_exports()}


def _plain_attribute_docstrings() -> None:
    """Read an attribute's or property's docstring as text, not as ``type: description``.

    This package's attribute docstrings are sentences (``"Curvature: the exact GGN"``);
    napoleon would take the words before the first colon for a type.
    """
    from sphinx.ext.napoleon import docstring

    def consume(self):
        return "", self.__class__(self._dedent(self._consume_to_end()), self._config).lines()

    docstring.GoogleDocstring._consume_inline_attribute = consume


_plain_attribute_docstrings()

# A reference to anything of this package that does not resolve is a warning (an error
# under -W); references into the libraries it builds on are not checked (offline build,
# no intersphinx inventories).
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"^(?!kfoc_backpack\b).*\..*"),  # dotted names outside this package
    (r"py:.*", r"^(int|float|str|bool|bytes|dict|list|tuple|set|type|object|None|callable)$"),
    (r"py:.*", r"^(Tensor|Module|Parameter|Any|Callable|Iterable|Iterator|Sequence|Mapping)$"),
    (r"py:.*", r"^(Optional|Union|Literal|Self|ClassVar|TypeVar|Generic|Enum|StrEnum|Path)$"),
    (r"py:.*", r"^(T|_T|ndarray|dtype|device|Generator|ProcessGroup|DataLoader)$"),
    (r"py:.*", r"^kfoc_backpack\..*\.[A-Z]$"),  # type variables
    (r"py:.*", r"(^|\.)_\w*$"),  # private helpers and dunders are not in the reference
]

# Gallery: docs/examples/*.py, executed during the full build; `-D plot_gallery=0` (the
# fast build) renders them without running them.
sphinx_gallery_conf = {
    "examples_dirs": ["examples"],
    "gallery_dirs": ["auto_examples"],
    "filename_pattern": r"/plot_",
    "ignore_pattern": r"/_",
    "within_subsection_order": "FileNameSortKey",
    "download_all_examples": False,
    "remove_config_comments": True,
    "abort_on_example_error": True,
    "run_stale_examples": False,
    "plot_gallery": "True",
    "matplotlib_animations": False,
    "image_scrapers": ("matplotlib",),
    "show_memory": False,
    "write_computation_times": True,
}
suppress_warnings = ["config.cache"]

html_theme = "furo"
html_title = f"kfoc-backpack {release}"
html_static_path: list[str] = []
html_show_sourcelink = False

# Where the measured numbers come from (a test renders the site from a modified copy).
kfoc_reference_dir = str(ROOT / "integration" / "reference")
