"""Render the measured numbers of ``integration/reference/*.json`` into the documentation.

Every measured figure the site shows has one home: the reference JSON that an
``integration/`` script wrote. At ``builder-inited`` this extension reads those files
(from the ``kfoc_reference_dir`` configuration value, by default
``integration/reference``) and writes one Markdown snippet per table into
``docs/_generated/``, using the script's own table formatter where it has one (the
tables are what the script prints after a run). Pages include a snippet with

.. code-block:: markdown

    ```{include} ../_generated/benchmark_cpu.md
    ```

and quote a single value inline with the role ``{refvalue}`name``` (the names are the
keys of :data:`VALUES`). A re-measurement is a JSON change; the next build shows it.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

from docutils import nodes

HERE = Path(__file__).resolve().parent
DOCS = HERE.parent
ROOT = DOCS.parent
GENERATED = DOCS / "_generated"


def _scripts() -> None:
    """Make the integration scripts importable by name (as they import each other)."""
    path = str(ROOT / "integration")
    if path not in sys.path:
        sys.path.insert(0, path)


def _load(ref: Path, name: str):
    return json.loads((ref / name).read_text())


def _headings_to_bold(markdown: str) -> str:
    """Turn a script's ``#`` headings into bold lines, so a snippet nests in any page."""
    out = []
    for line in markdown.splitlines():
        if line.startswith("#"):
            out.append(f"**{line.lstrip('#').strip()}**")
        else:
            out.append(line)
    return "\n".join(out)


def _provenance(data: dict, script: str) -> str:
    """One line naming the command and the machine, from the record itself."""
    parts = []
    command = data.get("command") or f"python integration/{script}"
    parts.append(f"Command: `{command.strip()}`")
    machine = data.get("machine")
    if isinstance(machine, dict):
        machine = ", ".join(f"{k} {v}" for k, v in machine.items() if k != "platform")
    if machine:
        parts.append(f"machine: {machine}")
    for key in ("torch", "threads", "repeats"):
        if key in data and not (isinstance(machine, str) and key in machine):
            parts.append(f"{key}: {data[key]}")
    return "; ".join(parts) + "."


# --------------------------------------------------------------------------------------
# Tables: name -> function(reference directory) -> Markdown
# --------------------------------------------------------------------------------------


def paper_tables(ref: Path) -> str:
    import paper

    results = _load(ref, "paper_results.json")
    runtime = _load(ref, "paper_runtime.json")
    samples = {r["dataset"]: r["samples"] for r in runtime}
    return _headings_to_bold(paper.markdown_tables(results, runtime, samples))


def _posterior_summary(ref: Path) -> tuple[list[dict], list[dict], int]:
    from posterior_study import report

    records = _load(ref, "posterior_results.json")
    seeds = len({r["seed"] for r in records})
    return report.summarize(records), report.paired_comparison(records), seeds


def posterior_tables(ref: Path) -> str:
    from posterior_study import report

    summary, paired, seeds = _posterior_summary(ref)
    return _headings_to_bold(report.markdown_tables(summary, paired, [], seeds))


POSTERIOR_COLUMNS = (
    ("map", "MAP"),
    ("kron", "K-FAC (kron)"),
    ("kfoc_approx", "K-FOC_approx"),
    ("kfoc_running", "K-FOC_running"),
    ("kfoc_optimal", "K-FOC_optimal"),
    ("ekfoc", "EK-FOC (ekfoc)"),
    ("ekfac", "EK-FAC (ekfac)"),
    ("full", "full"),
)


def posterior_nll(ref: Path) -> str:
    """Test NLL per data set and method, exact GGN (the decision's evidence)."""
    from posterior_study import report

    summary, _, seeds = _posterior_summary(ref)
    methods = [m for m, _ in POSTERIOR_COLUMNS if m in report.METHODS]
    header = [label for m, label in POSTERIOR_COLUMNS if m in methods]
    lines = [
        f"Test NLL, mean ± standard error over {seeds} seeds, exact GGN (regression in "
        "standardised units); rotated MNIST: the mean over all angles.",
        "",
        "| data set | prior | " + " | ".join(header) + " |",
        "|---|---|" + "---|" * len(header),
    ]
    datasets = list(dict.fromkeys(r["dataset"] for r in summary))
    for dataset in datasets:
        for prior in ("marglik", "gridsearch"):
            cells = []
            for method in methods:
                rows = [
                    r
                    for r in summary
                    if r["dataset"] == dataset
                    and "angle" not in r
                    and r["method"] == method
                    and r["curvature"] in ("ggn", "none")
                    and r["prior_fit"] in (prior, "none")
                ]
                cells.append(
                    f"{rows[0]['nll_mean']:.3f} ± {rows[0]['nll_se']:.3f}" if rows else "—"
                )
            name = report.NAMES.get(dataset, dataset)
            lines.append(f"| {name} | {prior} | " + " | ".join(cells) + " |")
        rotated = [r for r in summary if r["dataset"] == dataset and "angle" in r]
        if rotated:
            cells = []
            for method in methods:
                rows = [
                    r["nll_mean"]
                    for r in rotated
                    if r["method"] == method
                    and r["curvature"] in ("ggn", "none")
                    and r["prior_fit"] in ("marglik", "none")
                ]
                cells.append(f"{statistics.fmean(rows):.3f}" if rows else "—")
            lines.append(f"| {name}, rotated 0–180° (mean) | marglik | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _drop_empty_columns(markdown: str, empty: str = "–") -> str:
    """Remove the columns of a Markdown table whose every body cell is ``empty``."""
    rows = [line.strip().strip("|").split("|") for line in markdown.splitlines()]
    body = rows[2:]
    keep = [i for i in range(len(rows[0])) if any(r[i].strip() != empty for r in body)]
    return "\n".join("| " + " | ".join(r[i].strip() for i in keep) + " |" for r in rows)


def _route_summary(record: dict) -> str:
    """Summarise the solve routes and Lanczos steps of a record's shared-weight layers."""
    routes = {k: v for k, v in record.get("routes", {}).items() if v}
    steps = record.get("iterations_per_layer", {})
    if not routes:
        return "–"
    if len(routes) == 1:
        ((layer, route),) = routes.items()
        return f"{route}, {steps.get(layer, float('nan')):g}"
    counts: dict[str, int] = {}
    for route in routes.values():
        counts[route] = counts.get(route, 0) + 1
    return ", ".join(f"{route} ×{n}" for route, n in counts.items())


def benchmark_table(file: str) -> Callable[[Path], str]:
    def render(ref: Path) -> str:
        import benchmark

        records = _load(ref, file)
        for record in records:  # older records (the GPU run) predate the operation counts
            record.setdefault("ops", None)
            record.setdefault("ops_accelerator_routes", None)
        lines = benchmark.summary(records).splitlines()
        by_key = {(r["model"], r["batch_size"], r["method"]): r for r in records}
        if any(r.get("routes") for r in records):
            lines[0] += " KFOC route, steps | KFOCExact route, steps |"
            lines[1] += "---|---|"
            for i, key in enumerate(dict.fromkeys((r["model"], r["batch_size"]) for r in records)):
                kfoc, exact = by_key[(*key, "KFOC")], by_key[(*key, "KFOCExact")]
                lines[i + 2] += f" {_route_summary(kfoc)} | {_route_summary(exact)} |"
        return _drop_empty_columns("\n".join(lines))

    return render


def laplace_speed(ref: Path) -> str:
    import laplace_speed as script

    data = _load(ref, "laplace_speed_cpu.json")
    return _provenance(data, "laplace_speed.py") + "\n\n" + script.table(data["fits"])


def laplace_flops(ref: Path) -> str:
    import laplace_speed as script

    return script.flops_table(_load(ref, "laplace_speed_cpu.json")["flops"])


def zoo_curvature_of(file: str) -> Callable[[Path], str]:
    def render(ref: Path) -> str:
        import zoo

        data = _load(ref, file)
        return _provenance(data, "zoo.py") + "\n\n" + zoo.table(data["models"])

    return render


def zoo_whole(ref: Path) -> str:
    import zoo

    data = _load(ref, "zoo_whole_cpu.json")
    return _provenance(data, "zoo.py --sections whole") + "\n\n" + zoo.whole_table(data["whole"])


def correction_cost(ref: Path) -> str:
    import correction_cost as script

    data = _load(ref, "correction_cost_cpu.json")
    return _provenance(data, "correction_cost.py") + "\n\n" + script.table(data["models"])


def distributed(ref: Path) -> str:
    data = _load(ref, "distributed_cpu.json")
    lines = [
        f"{data['world']} processes against 1, {data['samples']} inputs, device "
        f"{data['device']}; command: `torchrun --standalone --nproc_per_node=2 "
        "integration/distributed.py`.",
        "",
        "| aggregation | max relative difference of a layer's `L ⊗ R`, 2 processes vs 1 "
        "| collectives | bytes per rank | 1 process s | 2 processes s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in data["rows"]:
        lines.append(
            f"| `{row['aggregation']}` | {row['max_relative_difference']:.1e} "
            f"| {row['collectives']} | {row['bytes']:,} | {row['seconds_1']:.1f} "
            f"| {row['seconds_2']:.1f} |"
        )
    return "\n".join(lines)


def grouped_of(file: str) -> Callable[[Path], str]:
    def render(ref: Path) -> str:
        import grouped as script

        data = _load(ref, file)
        return _provenance(data, "grouped.py") + "\n\n" + script.table(data["layers"])

    return render


def stopping_of(*files: str) -> Callable[[Path], str]:
    def render(ref: Path) -> str:
        import stopping as script

        parts = []
        for name in files:
            data = _load(ref, name)
            parts.append(_provenance(data, "stopping.py") + "\n\n" + script.table(data["summary"]))
        return "\n\n".join(parts)

    return render


def diagonal_routes(ref: Path) -> str:
    import diagonal_routes as script

    data = _load(ref, "diagonal_routes_cpu.json")
    return _provenance(data, "diagonal_routes.py") + "\n\n" + script.table(data["layers"])


def influence(ref: Path) -> str:
    from influence_study import report

    data = _load(ref, "influence_cpu.json")
    settings = ", ".join(f"{k} {v}" for k, v in data["settings"].items())
    text = report.markdown(data["summary"], data["paired"])
    return _provenance(data, "influence.py") + f" Settings: {settings}.\n\n" + text


def influence_speed(ref: Path) -> str:
    import influence_speed as script

    data = _load(ref, "influence_speed_cpu.json")
    return _provenance(data, "influence_speed.py") + "\n\n" + script.table(data)


TABLES: dict[str, Callable[[Path], str]] = {
    "paper_tables": paper_tables,
    "posterior_nll": posterior_nll,
    "posterior_tables": posterior_tables,
    "benchmark_cpu": benchmark_table("benchmark_cpu.json"),
    "benchmark_resnet_cpu": benchmark_table("benchmark_resnet_cpu.json"),
    "benchmark_h200": benchmark_table("benchmark_h200.json"),
    "laplace_speed": laplace_speed,
    "laplace_flops": laplace_flops,
    "zoo_curvature": zoo_curvature_of("zoo_cpu.json"),
    "zoo_curvature_224": zoo_curvature_of("zoo_224_cpu.json"),
    "zoo_grouped": zoo_curvature_of("zoo_grouped_cpu.json"),
    "zoo_grouped_224": zoo_curvature_of("zoo_grouped_224_cpu.json"),
    "zoo_whole": zoo_whole,
    "correction_cost": correction_cost,
    "distributed": distributed,
    "grouped": grouped_of("grouped_cpu.json"),
    "grouped_224": grouped_of("grouped_224_cpu.json"),
    "stopping": stopping_of(
        "stopping_cpu.json", "stopping_resnet18_cpu.json", "stopping_vit_tiny_cpu.json"
    ),
    "stopping_224": stopping_of("stopping_224_cpu.json"),
    "diagonal_routes": diagonal_routes,
    "influence": influence,
    "influence_speed": influence_speed,
}


# --------------------------------------------------------------------------------------
# Single values: name -> function(reference directory) -> text
# --------------------------------------------------------------------------------------


def _zoo_whole_value(model: str, method: str, key: str, fmt: str) -> Callable[[Path], str]:
    def value(ref: Path) -> str:
        for rec in _load(ref, "zoo_whole_cpu.json")["whole"]:
            if rec["model"] == model:
                return format(rec[method][key], fmt)
        raise KeyError(model)

    return value


def _benchmark_torch(file: str) -> Callable[[Path], str]:
    def value(ref: Path) -> str:
        records = _load(ref, file)
        versions = {r.get("torch") for r in records if isinstance(r, dict)} - {None}
        return ", ".join(sorted(versions)) or "not recorded"

    return value


VALUES: dict[str, Callable[[Path], str]] = {
    "zoo_whole.resnet18.kfoc.predict_s": _zoo_whole_value(
        "resnet18", "kfoc", "predict_s_per_input", ".2f"
    ),
    "zoo_whole.resnet18.kron.predict_s": _zoo_whole_value(
        "resnet18", "kron", "predict_s_per_input", ".1f"
    ),
    "zoo_whole.resnet18.kron.predict_mb": _zoo_whole_value(
        "resnet18", "kron", "predict_added_peak_mb", ".0f"
    ),
    "zoo_whole.resnet18.kfoc.predict_mb": _zoo_whole_value(
        "resnet18", "kfoc", "predict_added_peak_mb", ".0f"
    ),
    "benchmark_h200.torch": _benchmark_torch("benchmark_h200.json"),
}


# --------------------------------------------------------------------------------------
# Sphinx glue
# --------------------------------------------------------------------------------------


def render_all(ref: Path, out: Path = GENERATED) -> dict[str, str]:
    """Write every table's snippet into ``out`` (only files whose text changed)."""
    _scripts()
    out.mkdir(parents=True, exist_ok=True)
    rendered = {}
    for name, render in TABLES.items():
        text = render(ref).rstrip() + "\n"
        path = out / f"{name}.md"
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        rendered[name] = text
    return rendered


def _builder_inited(app) -> None:
    ref = Path(app.config.kfoc_reference_dir)
    render_all(ref)
    app.env.kfoc_values = {name: value(ref) for name, value in VALUES.items()}


def _refvalue_role(name, rawtext, text, lineno, inliner, options=None, content=None):
    env = inliner.document.settings.env
    values = getattr(env, "kfoc_values", {})
    if text not in values:
        message = inliner.reporter.error(f"refvalue: no value named {text!r}", line=lineno)
        return [inliner.problematic(rawtext, rawtext, message)], [message]
    if not hasattr(env, "kfoc_value_docs"):
        env.kfoc_value_docs = set()
    env.kfoc_value_docs.add(env.docname)
    return [nodes.Text(values[text])], []


def _env_get_outdated(app, env, added, changed, removed):
    """Reread the pages that quote a value when the values changed.

    The pages that include a table snippet are reread by Sphinx itself, which tracks
    included files: a snippet is rewritten only when its text changed.
    """
    values = env.kfoc_values
    if getattr(env, "kfoc_values_seen", None) != values:
        env.kfoc_values_seen = dict(values)
        return sorted(getattr(env, "kfoc_value_docs", set()) & env.found_docs)
    return []


def _env_purge_doc(app, env, docname):
    getattr(env, "kfoc_value_docs", set()).discard(docname)


def setup(app):
    """Register the configuration value, the snippet writer and the ``refvalue`` role."""
    # "" : a changed directory rereads only the pages whose snippets or values changed
    app.add_config_value("kfoc_reference_dir", str(ROOT / "integration" / "reference"), "")
    app.connect("builder-inited", _builder_inited)
    app.connect("env-get-outdated", _env_get_outdated)
    app.connect("env-purge-doc", _env_purge_doc)
    app.add_role("refvalue", _refvalue_role)
    return {"version": "1", "parallel_read_safe": True, "env_version": 1}


if __name__ == "__main__":  # python docs/_ext/reference.py [REFERENCE_DIR]: print the tables
    directory = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "integration" / "reference"
    for table_name, table_text in render_all(directory).items():
        print(f"## {table_name} ({platform.python_version()})\n\n{table_text}")
