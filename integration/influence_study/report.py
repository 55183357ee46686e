"""Summaries over repeats, paired differences, the markdown table and the figure.

Reads the records of :func:`influence_study.lds.run_repeat` (one per problem × repeat ×
method × damping), so a fresh run and a redraw of its ``influence.json`` give the same
outputs.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path

from influence_study.lds import DEFAULT_DAMPING, LABELS, METHODS

PAIRS = (("ekfoc", "ekfac"), ("kfoc", "kfac"))
"""Paired differences (same problem, repeat and damping): K-FOC's basis minus K-FAC's."""


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (0 for one value)."""
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return mean, se


def summarize(records: list[dict]) -> list[dict]:
    """Per problem, method and damping: LDS mean ± SE over repeats, median seconds."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[r["problem"], r["method"], r["damping"]].append(r)
    rows = []
    for (problem, method, damping), group in groups.items():
        mean, se = mean_se([r["lds"] for r in group])
        rows.append(
            {
                "problem": problem,
                "method": method,
                "damping": damping,
                "lds_mean": mean,
                "lds_se": se,
                "repeats": len(group),
                "seconds_median": statistics.median(r["seconds"] for r in group),
            }
        )
    return rows


def paired(records: list[dict]) -> list[dict]:
    """Per problem, damping and pair of :data:`PAIRS`: the differences by repeat, mean ± SE."""
    index = {(r["problem"], r["repeat"], r["method"], r["damping"]): r["lds"] for r in records}
    rows = []
    problems = sorted({r["problem"] for r in records})
    dampings = sorted({r["damping"] for r in records})
    repeats = sorted({r["repeat"] for r in records})
    for problem in problems:
        for damping in dampings:
            for ours, theirs in PAIRS:
                diffs = [
                    index[problem, k, ours, damping] - index[problem, k, theirs, damping]
                    for k in repeats
                    if (problem, k, ours, damping) in index
                    and (problem, k, theirs, damping) in index
                ]
                if not diffs:
                    continue
                mean, se = mean_se(diffs)
                rows.append(
                    {
                        "problem": problem,
                        "damping": damping,
                        "pair": f"{ours} - {theirs}",
                        "differences": diffs,
                        "mean": mean,
                        "se": se,
                    }
                )
    return rows


def markdown(summary: list[dict], pairs: list[dict], damping: float = DEFAULT_DAMPING) -> str:
    """Return the LDS table at ``damping``, the sensitivity table, the paired differences."""
    problems = sorted({r["problem"] for r in summary})
    methods = [m for m in METHODS if any(r["method"] == m for r in summary)]
    at = {(r["problem"], r["method"], r["damping"]): r for r in summary}

    def by_method(cell) -> list[str]:
        """Return a data set × method table at ``damping``, ``cell(row)`` per summary row."""
        table = ["| data set | " + " | ".join(LABELS[m] for m in methods) + " |"]
        table.append("|---|" + "---|" * len(methods))
        for problem in problems:
            rows = [at.get((problem, method, damping)) for method in methods]
            cells = ["–" if row is None else cell(row) for row in rows]
            table.append(f"| {problem} | " + " | ".join(cells) + " |")
        return table

    lines = [
        f"LDS (mean ± SE over repeats), damping {damping} × each block's mean eigenvalue",
        "",
        *by_method(lambda row: f"{row['lds_mean']:.3f} ± {row['lds_se']:.3f}"),
        "",
        "Seconds per method (median over repeats: curvature fit and scores)",
        "",
        *by_method(lambda row: f"{row['seconds_median']:.2f}"),
    ]
    dampings = sorted({r["damping"] for r in summary})
    if len(dampings) > 1:
        lines += ["", "Damping sensitivity (LDS mean over repeats)", ""]
        lines += ["| data set | method | " + " | ".join(f"{d:g}" for d in dampings) + " |"]
        lines += ["|---|---|" + "---|" * len(dampings)]
        for problem in problems:
            for method in methods:
                cells = []
                for d in dampings:
                    row = at.get((problem, method, d))
                    cells.append("–" if row is None else f"{row['lds_mean']:.3f}")
                if any(c != "–" for c in cells):
                    lines.append(f"| {problem} | {LABELS[method]} | " + " | ".join(cells) + " |")
    lines += ["", f"Paired LDS differences at damping {damping} (mean ± SE over repeats)", ""]
    lines += ["| data set | pair | mean ± SE | per repeat |", "|---|---|---|---|"]
    for row in pairs:
        if row["damping"] != damping:
            continue
        each = ", ".join(f"{d:+.3f}" for d in row["differences"])
        lines.append(
            f"| {row['problem']} | {row['pair']} | {row['mean']:+.3f} ± {row['se']:.3f} | {each} |"
        )
    return "\n".join(lines)


def plot(summary: list[dict], out: Path, damping: float = DEFAULT_DAMPING) -> Path | None:
    """``figure_influence.png``: LDS per data set and method (bars, ± SE), and sensitivity."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    problems = sorted({r["problem"] for r in summary})
    methods = [m for m in METHODS if any(r["method"] == m for r in summary)]
    at = {(r["problem"], r["method"], r["damping"]): r for r in summary}
    dampings = sorted({r["damping"] for r in summary})
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        xs, ys, es = [], [], []
        for j, problem in enumerate(problems):
            row = at.get((problem, method, damping))
            if row is not None:
                xs.append(j + (i - (len(methods) - 1) / 2) * width)
                ys.append(row["lds_mean"])
                es.append(row["lds_se"])
        axes[0].bar(xs, ys, width, yerr=es, label=LABELS[method], capsize=2)
    axes[0].set_xticks(range(len(problems)), problems)
    axes[0].set_ylabel("LDS (Spearman)")
    axes[0].set_title(f"Linear datamodeling score, damping {damping:g} × mean eigenvalue")
    axes[0].legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    for method in methods:
        if method == "kronfluence_ekfac":
            continue
        covered = [p for p in problems if all((p, method, d) in at for d in dampings)]
        if not covered:
            continue
        ys = [statistics.fmean(at[p, method, d]["lds_mean"] for p in covered) for d in dampings]
        label = LABELS[method]
        if len(covered) < len(problems):
            label += f" ({', '.join(covered)} only)"
        axes[1].plot(dampings, ys, marker="o", label=label)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("damping (× each block's mean eigenvalue)")
    axes[1].set_ylabel("LDS, mean over the data sets")
    axes[1].set_title("Damping sensitivity")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    path = out / "figure_influence.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
