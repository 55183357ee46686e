"""Resolve references to this package's names wherever a docstring writes them.

Docstrings name an object by the path a user imports it from (``kfoc_backpack.KFOC``,
``kfoc_backpack.solver.OuterTerms``) or unqualified within its module (``DataPass``),
while the API reference documents each object once, in the module that defines it. A
reference autodoc cannot resolve is looked up here by importing the name (from the
referencing module, then from the package) and pointing it at the entry of the object's
defining module; a name that does not import stays unresolved and is a warning (an error
under ``-W``), so a broken reference fails the build.

Objects defined in a private module (``kfoc_backpack.solver._common``) but exported by a
public package are documented on that package's page (``PRIVATE_EXPORTS``, handed to the
autosummary template).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from sphinx.util.nodes import make_refnode

PACKAGE = "kfoc_backpack"


def _import(path: str):
    """Import the object at a dotted path (None if there is none)."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def _is_private(module: str) -> bool:
    return any(part.startswith("_") for part in module.split("."))


def private_exports() -> dict[str, list[tuple[str, str]]]:
    """Per public package: its ``__all__`` names defined in a private module.

    Returns ``{package: [(name, autodoc directive)]}``.
    """
    package = importlib.import_module(PACKAGE)
    found: dict[str, list[tuple[str, str]]] = {}
    modules = [PACKAGE] + [
        m.name
        for m in pkgutil.walk_packages(package.__path__, PACKAGE + ".")
        if not _is_private(m.name)
    ]
    for name in modules:
        module = importlib.import_module(name)
        if not hasattr(module, "__path__"):
            continue
        for export in getattr(module, "__all__", []):
            obj = getattr(module, export, None)
            origin = getattr(obj, "__module__", None) or ""
            if not origin.startswith(PACKAGE) or not _is_private(origin):
                continue
            if inspect.isclass(obj):
                kind = "autoexception" if issubclass(obj, BaseException) else "autoclass"
            elif callable(obj):
                kind = "autofunction"
            else:
                continue
            found.setdefault(name, []).append((export, kind))
    # document each object once: on the innermost public package that exports it
    innermost: dict[int, str] = {}
    for name, items in found.items():
        for export, _ in items:
            obj = getattr(importlib.import_module(name), export)
            if len(name) > len(innermost.get(id(obj), "")):
                innermost[id(obj)] = name
    return {
        name: [
            (export, kind)
            for export, kind in items
            if innermost[id(getattr(importlib.import_module(name), export))] == name
        ]
        for name, items in found.items()
    }


def _documented(domain, name: str):
    return domain.objects.get(name)


def _candidates(obj, exports: dict[str, list[tuple[str, str]]]) -> list[str]:
    """Names under which ``obj`` may be documented."""
    names = []
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if module and qualname:
        names.append(f"{module}.{qualname}")
    elif inspect.ismodule(obj):
        names.append(obj.__name__)
    for package, items in exports.items():
        for export, _ in items:
            if getattr(importlib.import_module(package), export, None) is obj:
                names.append(f"{package}.{export}")
    return names


def _missing_reference(app, env, node, contnode):
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    if not target:
        return None
    context = node.get("py:module") or ""
    klass = node.get("py:class") or ""
    paths = [target]
    if context:
        if klass:
            paths.append(f"{context}.{klass}.{target}")
        paths.append(f"{context}.{target}")
        # a sibling or parent package's name (``DataPass`` in ``kfoc_backpack.dataset.x``)
        parts = context.split(".")
        paths += [".".join(parts[:i] + [target]) for i in range(len(parts) - 1, 0, -1)]
    if not any(p.startswith(PACKAGE) for p in paths):
        return None
    domain = env.get_domain("py")
    exports = env.kfoc_private_exports
    for path in paths:
        if not path.startswith(PACKAGE):
            continue
        obj = _import(path)
        owner, _, attr = path.rpartition(".")
        if obj is None:
            # a dataclass or NamedTuple field: documented in its class's entry ("Attributes:")
            holder = _import(owner)
            fields = {}
            for base in getattr(holder, "__mro__", ()):
                fields.update(getattr(base, "__annotations__", {}))
            if inspect.isclass(holder) and attr in fields:
                for name in _candidates(holder, exports):
                    entry = _documented(domain, name)
                    if entry is not None:
                        return make_refnode(
                            app.builder,
                            node["refdoc"],
                            entry.docname,
                            entry.node_id,
                            contnode,
                            name,
                        )
            continue
        names = _candidates(obj, exports)
        holder = _import(owner)
        if inspect.isclass(holder):  # a method or attribute: under its defining class
            names += [f"{n}.{attr}" for n in _candidates(holder, exports)]
            for base in holder.__mro__[1:]:
                if attr in vars(base):
                    names += [f"{n}.{attr}" for n in _candidates(base, exports)]
                    break
        for name in names:
            entry = _documented(domain, name)
            if entry is not None:
                return make_refnode(
                    app.builder, node["refdoc"], entry.docname, entry.node_id, contnode, name
                )
    return None


def _builder_inited(app):
    app.env.kfoc_private_exports = private_exports()


def setup(app):
    """Register the resolver."""
    app.connect("builder-inited", _builder_inited)
    app.connect("missing-reference", _missing_reference)
    return {"version": "1", "parallel_read_safe": True}
