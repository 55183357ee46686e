"""Summaries, the paired comparison, the markdown tables and the output files of a run.

Everything here reads the records (``dict``) of
:func:`integration.posterior_study.protocol.run`, one per data set × method × curvature
× prior fit × seed, with ``"angle"`` for rotated MNIST, so a fresh run and a
``--replot`` of its ``results.json`` give the same tables: :func:`summarize` (mean ±
standard error over seeds), :func:`paired_comparison` and :func:`paired_by_angle`
(each method of :data:`~integration.posterior_study.protocol.COMPARISONS` against its
reference on the same seed), :func:`markdown_tables`, and :func:`write_outputs`,
which writes the JSON files and ``table.md`` and draws the figures of
:mod:`integration.posterior_study.figures`.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from data import TASKS

from posterior_study.figures import plot_datasets, plot_paired, plot_rotation
from posterior_study.protocol import (
    AGAINST_REFERENCE,
    COMPARISONS,
    CURVATURES,
    GRID,
    HEADERS,
    LABELS,
    METHODS,
    NAMES,
    PRIOR_FITS,
    REFERENCE,
)

# --------------------------------------------------------------------------------------
# Summaries and the paired comparison
# --------------------------------------------------------------------------------------


LOWER_IS_BETTER = {
    "nll": True,
    "rmse": True,
    "ece": True,
    "brier": True,
    "accuracy": False,
    "log_marglik": False,
}


def metric_names(task: str) -> list[str]:
    """Metrics of a task, in table order."""
    if task == "classification":
        return ["nll", "accuracy", "ece", "brier", "log_marglik", "fit_seconds"]
    return ["nll", "rmse", "log_marglik", "fit_seconds"]


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for a single value)."""
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return mean, se


def _key(record: dict) -> tuple:
    return (
        record["dataset"],
        record["method"],
        record["curvature"],
        record["prior_fit"],
        record.get("angle"),
    )


def summarize(records: list[dict]) -> list[dict]:
    """Mean ± standard error over seeds per data set, method, curvature, prior fit, angle."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for record in records:
        groups[_key(record)].append(record)
    out = []
    for key, group in groups.items():
        dataset, method, curvature, prior_fit, angle = key
        row = {
            "dataset": dataset,
            "method": method,
            "curvature": curvature,
            "prior_fit": prior_fit,
            "seeds": len(group),
        }
        if angle is not None:
            row["angle"] = angle
        for name in metric_names(TASKS[dataset]) + ["prior_precision"]:
            values = [r[name] for r in group if r.get(name) is not None]
            if values:
                row[f"{name}_mean"], row[f"{name}_se"] = mean_se(values)
        out.append(row)
    return out


def rotated_means(records: list[dict]) -> list[dict]:
    """Return per seed the mean of each metric over the rotation angles.

    The records' ``dataset`` is ``"<dataset>-rotated"``.
    """
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for record in records:
        if record.get("angle") is not None:
            key = (record["dataset"], record["method"], record["curvature"], record["prior_fit"])
            groups[key + (record["seed"],)].append(record)
    out = []
    for (dataset, method, curvature, prior_fit, seed), group in groups.items():
        row = {
            "dataset": f"{dataset}-rotated",
            "method": method,
            "curvature": curvature,
            "prior_fit": prior_fit,
            "seed": seed,
        }
        for name in ("nll", "accuracy", "ece", "brier"):
            row[name] = statistics.fmean(r[name] for r in group)
        out.append(row)
    return out


def paired_comparison(
    records: list[dict], comparisons: Sequence[tuple[str, str]] = COMPARISONS
) -> list[dict]:
    """Each ``(method, reference)`` pair per seed, same data set/curvature/prior fit.

    For each metric: seeds where the method is better, equal (difference below 1e-12) or
    worse, the mean difference ``method − reference`` with its standard error, and the
    seed-to-seed standard deviation of the reference's metric (the spread the
    difference is to be read against). Rotated MNIST enters as ``mnist-rotated``, the
    per-seed mean over the angles.
    """
    base = [r for r in records if r.get("angle") is None] + rotated_means(records)
    table: dict[tuple, dict] = {}
    for r in base:
        table[(r["dataset"], r["method"], r["curvature"], r["prior_fit"], r["seed"])] = r
    out = []
    combos = sorted({(r["dataset"], r["curvature"], r["prior_fit"]) for r in base})
    for dataset, curvature, prior_fit in combos:
        for method, reference in comparisons:
            for name, lower in LOWER_IS_BETTER.items():
                pairs = []
                for seed in sorted({r["seed"] for r in base if r["dataset"] == dataset}):
                    ours = table.get((dataset, method, curvature, prior_fit, seed))
                    ref = table.get((dataset, reference, curvature, prior_fit, seed))
                    if ours is None or ref is None:
                        continue
                    if ours.get(name) is None or ref.get(name) is None:
                        continue
                    pairs.append((ours[name], ref[name]))
                if not pairs:
                    continue
                diffs = [a - b for a, b in pairs]
                sign = -1 if lower else 1
                wins = sum(sign * d > 1e-12 for d in diffs)
                losses = sum(sign * d < -1e-12 for d in diffs)
                mean, se = mean_se(diffs)
                refs = [b for _, b in pairs]
                out.append(
                    {
                        "dataset": dataset,
                        "curvature": curvature,
                        "prior_fit": prior_fit,
                        "method": method,
                        "reference": reference,
                        "metric": name,
                        "seeds": len(pairs),
                        "wins": wins,
                        "ties": len(pairs) - wins - losses,
                        "losses": losses,
                        "mean_diff": mean,
                        "se_diff": se,
                        "reference_sd": statistics.stdev(refs) if len(refs) > 1 else 0.0,
                    }
                )
    return out


def paired_by_angle(records: list[dict], reference: str = REFERENCE) -> list[dict]:
    """Pair each method with K-FAC per rotation angle: mean difference of NLL and ECE ± SE."""
    table = {
        (r["method"], r["curvature"], r["prior_fit"], r["angle"], r["seed"]): r
        for r in records
        if r.get("angle") is not None
    }
    out = []
    for method, curvature, prior_fit, angle in sorted({k[:4] for k in table}):
        if method not in AGAINST_REFERENCE:
            continue
        for name in ("nll", "ece"):
            diffs = [
                table[(method, curvature, prior_fit, angle, seed)][name]
                - table[(reference, curvature, prior_fit, angle, seed)][name]
                for (m, c, f, a, seed) in table
                if (m, c, f, a) == (method, curvature, prior_fit, angle)
                and (reference, curvature, prior_fit, angle, seed) in table
            ]
            if diffs:
                mean, se = mean_se(diffs)
                out.append(
                    {
                        "method": method,
                        "curvature": curvature,
                        "prior_fit": prior_fit,
                        "angle": angle,
                        "metric": name,
                        "mean_diff": mean,
                        "se_diff": se,
                        "seeds": len(diffs),
                    }
                )
    return out


# --------------------------------------------------------------------------------------
# Markdown tables
# --------------------------------------------------------------------------------------


def _fmt(row: dict, name: str) -> str:
    if f"{name}_mean" not in row:
        return "—"
    mean, se = row[f"{name}_mean"], row[f"{name}_se"]
    if name == "log_marglik":
        return f"{mean:.1f} ± {se:.1f}"
    if name == "fit_seconds":
        return f"{mean:.2f} ± {se:.2f}"
    if name == "accuracy":
        return f"{100 * mean:.2f} ± {100 * se:.2f}"
    return f"{mean:.3f} ± {se:.3f}"


def _row_order(row: dict) -> tuple:
    return (
        (("none",) + PRIOR_FITS).index(row["prior_fit"]),
        METHODS.index(row["method"]),
        (("none",) + CURVATURES).index(row["curvature"]),
    )


def markdown_tables(
    summary: list[dict], paired: list[dict], skipped: list[dict], seeds: int
) -> str:
    """Format the results as markdown: per data set, rotated MNIST, paired comparison."""
    lines = [
        f"## Test metrics (mean ± standard error over {seeds} seed(s))",
        "",
        "Regression: NLL and RMSE in standardised target units. log marglik: the log "
        "marginal likelihood at the chosen prior precision (a sum over the training set). "
        "fit: `la.fit` wall time.",
        "",
    ]
    datasets = list(dict.fromkeys(r["dataset"] for r in summary))
    for dataset in datasets:
        names = metric_names(TASKS[dataset])
        rows = sorted(
            (r for r in summary if r["dataset"] == dataset and "angle" not in r), key=_row_order
        )
        lines += [
            f"### {NAMES.get(dataset, dataset)}",
            "",
            "| prior fit | method | curvature | " + " | ".join(HEADERS[n] for n in names) + " |",
            "|---|---|---|" + "---|" * len(names),
        ]
        for row in rows:
            cells = [_fmt(row, n) for n in names]
            lines.append(
                f"| {row['prior_fit']} | {LABELS[row['method']]} | {row['curvature']} | "
                + " | ".join(cells)
                + " |"
            )
        for skip in skipped:
            if skip["dataset"] == dataset:
                lines.append(
                    f"| — | {LABELS[skip['method']]} | {skip['curvature']} | skipped: "
                    f"{skip['reason']} |" + " |" * (len(names) - 1)
                )
        lines.append("")
    rotated = [r for r in summary if "angle" in r]
    if rotated:
        angles = sorted({r["angle"] for r in rotated})
        shown = [a for a in angles if a in (0, 45, 90, 135, 180)] or angles
        for name in ("nll", "ece"):
            lines += [
                f"### Rotated MNIST: {HEADERS[name]} against the angle",
                "",
                "| prior fit | method | curvature | "
                + " | ".join(f"{a}°" for a in shown)
                + " | mean over all angles |",
                "|---|---|---|" + "---|" * (len(shown) + 1),
            ]
            keys = sorted(
                {(r["prior_fit"], r["method"], r["curvature"]) for r in rotated},
                key=lambda k: _row_order({"prior_fit": k[0], "method": k[1], "curvature": k[2]}),
            )
            for prior_fit, method, curvature in keys:
                cells = []
                by_angle = {
                    r["angle"]: r
                    for r in rotated
                    if (r["prior_fit"], r["method"], r["curvature"])
                    == (prior_fit, method, curvature)
                }
                for angle in shown:
                    cells.append(_fmt(by_angle[angle], name) if angle in by_angle else "—")
                overall = statistics.fmean(by_angle[a][f"{name}_mean"] for a in by_angle)
                cells.append(f"{overall:.3f}")
                lines.append(
                    f"| {prior_fit} | {LABELS[method]} | {curvature} | " + " | ".join(cells) + " |"
                )
            lines.append("")
    if paired:
        lines += paired_table(paired)
    return "\n".join(lines)


PAIRED_COLUMNS = (
    ("nll", "Δ test NLL", 1, 4),
    ("ece", "Δ ECE", 1, 4),
    ("accuracy", "Δ accuracy (%)", 100, 2),
    ("log_marglik", "Δ log marglik", 1, 1),
)


def paired_table(paired: list[dict]) -> list[str]:
    """Format the paired comparison as markdown lines, one section per reference.

    One row per data set, prior fit, curvature and method; a cell is
    ``mean ± SE (W/T/L)``.

    RMSE is left out: the glm predictive's mean is the MAP output for every method,
    so RMSE differences are exactly 0.
    """
    lines: list[str] = []
    index = {
        (p["reference"], p["dataset"], p["prior_fit"], p["curvature"], p["method"], p["metric"]): p
        for p in paired
    }
    for reference in dict.fromkeys(p["reference"] for p in paired):
        lines += [
            f"## Against {LABELS[reference]}, paired per seed",
            "",
            f"Difference method − {LABELS[reference]} on the same seed (same split, MAP model "
            "and prior-fit protocol): mean ± standard error over seeds, then (W/T/L) the "
            "seeds where the method is better / equal / worse (NLL, ECE: lower is better; "
            "accuracy, log marglik: higher). Reference SD: the seed-to-seed standard "
            "deviation of the reference's test NLL, the spread to read the NLL difference "
            "against. `mnist-rotated`: per seed, the mean over the 13 rotation angles. RMSE "
            "is not listed: the glm predictive mean is the MAP output for every method, so "
            "its difference is exactly 0.",
            "",
            "| data set | prior fit | curvature | method | "
            + " | ".join(header for _, header, _, _ in PAIRED_COLUMNS)
            + " | reference NLL SD |",
            "|---|---|---|---|" + "---|" * (len(PAIRED_COLUMNS) + 1),
        ]
        keys = list(dict.fromkeys(k[1:5] for k in index if k[0] == reference))
        for dataset, prior_fit, curvature, method in keys:
            cells = []
            for metric, _, scale, digits in PAIRED_COLUMNS:
                p = index.get((reference, dataset, prior_fit, curvature, method, metric))
                if p is None:
                    cells.append("—")
                    continue
                cells.append(
                    f"{scale * p['mean_diff']:+.{digits}f} ± {scale * p['se_diff']:.{digits}f} "
                    f"({p['wins']}/{p['ties']}/{p['losses']})"
                )
            nll = index.get((reference, dataset, prior_fit, curvature, method, "nll"))
            sd = f"{nll['reference_sd']:.4f}" if nll else "—"
            lines.append(
                f"| {dataset} | {prior_fit} | {curvature} | {LABELS[method]} | "
                + " | ".join(cells)
                + f" | {sd} |"
            )
        lines.append("")
    return lines


# --------------------------------------------------------------------------------------
# Output files
# --------------------------------------------------------------------------------------


def _rounded(record: dict) -> dict:
    """Return the record with its floats rounded to 7 significant digits."""
    return {
        k: float(f"{v:.7g}") if isinstance(v, float) and math.isfinite(v) else v
        for k, v in record.items()
    }


def grid_edge_notes(records: list[dict]) -> list[str]:
    """One line per data set and grid end: how many grid searches stopped there."""
    counts: dict[tuple[str, str], int] = defaultdict(int)
    totals: dict[str, int] = defaultdict(int)
    for r in records:
        if r["prior_fit"] != "gridsearch" or r.get("angle") is not None:
            continue
        totals[r["dataset"]] += 1
        if r["prior_precision"] >= GRID[-1] * (1 - 1e-6):
            counts[(r["dataset"], "upper end 10^4 (practically the MAP predictive)")] += 1
        elif r["prior_precision"] <= GRID[0] * (1 + 1e-6):
            counts[(r["dataset"], "lower end 10^-4")] += 1
    return [
        f"grid search on {dataset}: the {end} in {count} of {totals[dataset]} "
        "(method, curvature, seed) fits"
        for (dataset, end), count in counts.items()
    ]


def write_outputs(records: list[dict], out: Path, meta: dict, replot: bool = False) -> dict:
    """Write results.json, summary.json, paired.json, table.md, meta.json and figures.

    The records are rounded to 7 significant digits first (so that a ``--replot`` of the
    written file reproduces the table exactly) and written one per line. With
    ``replot=True`` only ``table.md`` and the figures are written.
    """
    out.mkdir(parents=True, exist_ok=True)
    records = [_rounded(r) for r in records]
    summary = summarize(records)
    paired = paired_comparison(records)
    seeds = len({r["seed"] for r in records})
    skipped = meta.get("skipped", [])
    table = markdown_tables(summary, paired, skipped, seeds)
    notes = []
    if meta.get("predictive_check"):
        worst = max(meta["predictive_check"].values())
        notes.append(
            f"glm predictive checked against laplace-torch's on seed 0 for "
            f"{len(meta['predictive_check'])} method(s): largest difference {worst:.1e}"
        )
    notes += grid_edge_notes(records)
    for key, messages in meta.get("warnings", {}).items():
        for message, count in messages.items():
            notes.append(f"{key}: {count}× {message}")
    if "wall_s" in meta:
        kind = "quick" if meta.get("quick") else "full"
        notes.append(f"wall time {meta['wall_s']:.0f} s ({kind} run, {meta.get('machine')})")
    if notes:
        table += "\n## Notes\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    if not replot:
        lines = ",\n".join(json.dumps(r, separators=(",", ":")) for r in records)
        (out / "results.json").write_text(f"[\n{lines}\n]\n")
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        (out / "paired.json").write_text(json.dumps(paired, indent=1))
        (out / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    (out / "table.md").write_text(table)
    figures = [
        str(path)
        for path in (
            plot_datasets(summary, out),
            plot_rotation(summary, paired_by_angle(records), out),
            plot_paired(paired, out),
        )
        if path is not None
    ]
    print(table)
    return {
        "records": records,
        "summary": summary,
        "paired": paired,
        "figures": figures,
        "table": table,
    }
