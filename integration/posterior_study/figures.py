"""The figures of a run (matplotlib, ``Agg`` backend), drawn from its summaries.

:func:`plot_datasets` writes ``figure_posterior_datasets.png`` (test NLL of every method
per data set), :func:`plot_rotation` ``figure_posterior_rotation.png`` (rotated MNIST
against the angle, and the paired K-FOC − K-FAC differences), :func:`plot_paired`
``figure_posterior_paired.png`` (the paired test-NLL differences in units of K-FAC's
seed-to-seed spread). Their inputs are the rows of
:mod:`integration.posterior_study.report`'s ``summarize``, ``paired_by_angle`` and
``paired_comparison``; each returns the path it wrote, or ``None`` when there is nothing
to draw. :data:`STYLE` gives each method its colour and marker.
"""

from __future__ import annotations

from pathlib import Path

from posterior_study.protocol import (
    AGAINST_REFERENCE,
    ANGLES,
    CURVATURES,
    HEADERS,
    LABELS,
    METHODS,
    NAMES,
    PRIOR_FITS,
    REFERENCE,
    MethodSpec,
)

STYLE = {
    "map": ("tab:gray", "o"),
    "diag": ("tab:orange", "s"),
    "kron": ("tab:green", "^"),
    "kron_backpack": ("tab:olive", "v"),
    "kfoc_approx": ("tab:blue", "o"),
    "kfoc_running": ("tab:red", "D"),
    "kfoc_optimal": ("tab:purple", "x"),
    "ekfoc": ("tab:brown", "P"),
    "ekfac": ("tab:cyan", "X"),
    "full": ("black", "*"),
}


def plot_rotation(summary: list[dict], paired_angles: list[dict], out: Path) -> Path | None:
    """Rotated MNIST against the angle; rows: prior fits; GGN solid, MC dashed.

    Columns: test NLL and ECE of every method (mean over seeds, band ± standard error),
    then the paired differences K-FOC − K-FAC of NLL and ECE (mean ± standard error).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary if "angle" in r]
    if not rows:
        return None
    prior_fits = [p for p in PRIOR_FITS if any(r["prior_fit"] == p for r in rows)]
    fig, axes = plt.subplots(
        len(prior_fits), 4, figsize=(19, 3.7 * len(prior_fits) + 1.0), squeeze=False, sharex=True
    )
    seeds = max(r["seeds"] for r in rows)
    for i, prior_fit in enumerate(prior_fits):
        for j, name in enumerate(("nll", "ece")):
            ax = axes[i][j]
            for method in METHODS:
                for curvature in ("none",) + CURVATURES:
                    pts = sorted(
                        (
                            r
                            for r in rows
                            if r["method"] == method
                            and r["curvature"] == curvature
                            and r["prior_fit"] in (prior_fit, "none")
                        ),
                        key=lambda r: r["angle"],
                    )
                    if pts:
                        _angle_line(ax, pts, name, method, curvature, band=False)
            ax.set_title(f"prior by {prior_fit}: test {HEADERS[name].removeprefix('test ')}")
            ax.set_ylabel(HEADERS[name])
        for j, name in enumerate(("nll", "ece"), start=2):
            ax = axes[i][j]
            for method in AGAINST_REFERENCE:
                for curvature in CURVATURES:
                    pts = sorted(
                        (
                            p
                            for p in paired_angles
                            if (p["method"], p["curvature"], p["prior_fit"], p["metric"])
                            == (method, curvature, prior_fit, name)
                        ),
                        key=lambda p: p["angle"],
                    )
                    if pts:
                        _angle_line(ax, pts, "diff", method, curvature)
            ax.axhline(0, color="black", linewidth=0.8)
            short = HEADERS[name].removeprefix("test ")
            ax.set_title(f"prior by {prior_fit}: {short} of method − K-FAC (paired)")
            ax.set_ylabel(f"{short} difference (< 0: method better)")
        for ax in axes[i]:
            ax.set_xticks(list(ANGLES)[::2])
            ax.grid(alpha=0.3)
            if i == len(prior_fits) - 1:
                ax.set_xlabel("rotation angle (degrees)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=7, fontsize=8, frameon=False)
    fig.suptitle(
        f"LeNet-5 on rotated MNIST test images: mean over {seeds} seed(s) (differences: band "
        "± standard error of the paired difference; the tables give every standard error); "
        "solid: exact GGN, dashed: MC Fisher; K-FAC = laplace-torch kron (default backend)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    path = out / "figure_posterior_rotation.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _angle_line(
    ax, pts: list[dict], name: str, method: str, curvature: str, band: bool = True
) -> None:
    """Draw one method's line against the angle (with a ± standard-error band)."""
    colour, marker = STYLE[method]
    x = [r["angle"] for r in pts]
    if name == "diff":
        y = [r["mean_diff"] for r in pts]
        se = [r["se_diff"] for r in pts]
    else:
        y = [r[f"{name}_mean"] for r in pts]
        se = [r[f"{name}_se"] for r in pts]
    label = LABELS[method] + ("" if curvature in ("none", "ggn") else " (MC)")
    ax.plot(
        x,
        y,
        color=colour,
        marker=marker,
        markersize=4,
        linestyle="--" if curvature == "mc" else "-",
        linewidth=1.2,
        label=label,
    )
    if band:
        low = [a - b for a, b in zip(y, se)]
        high = [a + b for a, b in zip(y, se)]
        ax.fill_between(x, low, high, color=colour, alpha=0.1, linewidth=0)


def plot_datasets(summary: list[dict], out: Path) -> Path | None:
    """Test NLL per method on every data set (rows: prior fits), mean ± standard error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary if "angle" not in r]
    if not rows:
        return None
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    prior_fits = [p for p in PRIOR_FITS if any(r["prior_fit"] == p for r in rows)] or ["none"]
    fig, axes = plt.subplots(
        len(prior_fits),
        len(datasets),
        figsize=(3.6 * len(datasets) + 1.5, 3.4 * len(prior_fits) + 0.6),
        squeeze=False,
    )
    seeds = max(r["seeds"] for r in rows)
    for i, prior_fit in enumerate(prior_fits):
        for j, dataset in enumerate(datasets):
            ax = axes[i][j]
            pts = sorted(
                (
                    r
                    for r in rows
                    if r["dataset"] == dataset and r["prior_fit"] in (prior_fit, "none")
                ),
                key=lambda r: (METHODS.index(r["method"]), r["curvature"]),
            )
            labels = []
            for k, r in enumerate(pts):
                colour, marker = STYLE[r["method"]]
                ax.errorbar(
                    r["nll_mean"],
                    k,
                    xerr=r["nll_se"],
                    color=colour,
                    marker=marker,
                    markerfacecolor="white" if r["curvature"] == "mc" else colour,
                    capsize=2,
                )
                labels.append(MethodSpec(r["method"], r["curvature"]).label)
            ax.set_yticks(range(len(pts)))
            ax.set_yticklabels(labels if j == 0 else [""] * len(pts), fontsize=8)
            ax.invert_yaxis()
            ax.grid(alpha=0.3, axis="x")
            ax.set_title(f"{NAMES.get(dataset, dataset)}, prior: {prior_fit}", fontsize=9)
            ax.set_xlabel("test NLL (lower is better)", fontsize=8)
            ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(
        f"Test NLL, mean ± standard error over {seeds} seed(s) (regression: standardised "
        "targets; open markers: MC Fisher)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    path = out / "figure_posterior_datasets.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_paired(paired: list[dict], out: Path) -> Path | None:
    """Plot each method's test-NLL difference to K-FAC per data set, relative to the spread.

    The K-FOC variants and the eigenvalue-corrected posteriors against ``kron``. Each
    point is the mean paired difference divided by K-FAC's seed-to-seed standard
    deviation (error bar: the standard error, divided alike); the text beside it is
    the number of seeds the method wins / ties / loses.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [p for p in paired if p["metric"] == "nll" and p["reference"] == REFERENCE]
    if not rows:
        return None
    datasets = list(dict.fromkeys(p["dataset"] for p in rows))
    keys = [
        (prior_fit, curvature, method)
        for prior_fit in PRIOR_FITS
        for curvature in CURVATURES
        for method in AGAINST_REFERENCE
        if any((p["prior_fit"], p["curvature"], p["method"]) == (prior_fit, curvature, method)
               for p in rows)
    ]  # fmt: skip
    fig, axes = plt.subplots(
        1, len(datasets), figsize=(2.6 * len(datasets) + 2.6, 0.32 * len(keys) + 1.8),
        squeeze=False, sharey=True,
    )  # fmt: skip
    for j, dataset in enumerate(datasets):
        ax = axes[0][j]
        for k, (prior_fit, curvature, method) in enumerate(keys):
            match = [
                p
                for p in rows
                if (p["dataset"], p["prior_fit"], p["curvature"], p["method"])
                == (dataset, prior_fit, curvature, method)
            ]
            if not match:
                continue
            p = match[0]
            sd = p["reference_sd"] if p["reference_sd"] > 0 else 1.0
            colour, marker = STYLE[method]
            ax.errorbar(
                p["mean_diff"] / sd, k, xerr=p["se_diff"] / sd, color=colour, marker=marker,
                markerfacecolor="white" if curvature == "mc" else colour, capsize=2,
            )  # fmt: skip
            ax.annotate(
                f"{p['wins']}/{p['ties']}/{p['losses']}", (1.0, k), xycoords=("axes fraction",
                "data"), xytext=(3, 0), textcoords="offset points", fontsize=6, va="center",
            )  # fmt: skip
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(keys)))
        ax.set_yticklabels([f"{LABELS[m]}, {c}, {f}" for f, c, m in keys], fontsize=7)
        ax.set_ylim(len(keys) - 0.5, -0.5)
        ax.grid(alpha=0.3, axis="x")
        ax.set_title(NAMES.get(dataset, dataset), fontsize=9)
        ax.set_xlabel("ΔNLL / SD of K-FAC's NLL", fontsize=8)
        ax.xaxis.set_major_locator(plt.MaxNLocator(4))
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(
        "Paired test-NLL difference method − K-FAC (kron), in units of K-FAC's seed-to-seed "
        "SD: mean ± SE over seeds (< 0: method better); text: seeds won/tied/lost",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.93), w_pad=2.5)
    path = out / "figure_posterior_paired.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
