r"""Figure-1-style plots: relative Frobenius error against batch size, per layer.

``integration/paper.py`` writes ``figure_<dataset>.png`` after every run. To redraw the
figures from a ``results.json`` without rerunning the experiment (for instance the
committed figures in ``docs/`` from the committed 10-seed reference results)::

    python integration/plots.py integration/reference/paper_results.json \
        --datasets boston mnist --out docs

Sample counts and layer shapes are read from the run's ``meta.json`` when it lies
beside the results file (or is given with ``--meta``); otherwise they are those of the
full data sets and of the paper's models (true for the reference results).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

STYLE = {
    # method: (label, colour, line style, marker) — the paper's colours where it has the
    # method; markers keep lines that coincide (e.g. at 0) distinguishable; the thin
    # dotted diagnostic is drawn on top of the others
    "diag": ("diagonal", "tab:orange", "-", "s"),
    "kfac": ("K-FAC", "tab:green", "-", "^"),
    "kfoc_approx": ("K-FOC_approx", "tab:blue", "-", "o"),
    "kfoc_running": ("K-FOC_running", "tab:red", "-", "o"),
    "kfoc_optimal": ("K-FOC_optimal", "tab:purple", "--", "x"),
    "kfoc_approx_paper": ("K-FOC_approx (paper's split)", "tab:cyan", ":", None),
}

NAMES = {
    "boston": "Boston Housing",
    "concrete": "Concrete",
    "energy": "Energy (heating load)",
    "mnist": "MNIST subset",
}

ZERO = 1e-6
"""Errors at most this large (every seed, every batch size) are reported as exact."""

Y_BOTTOM = -0.06
"""Lower y limit: lines at 0 are drawn above the x axis instead of hidden under it."""


def layer_title(layer: str, description: str | None) -> str:
    """Panel title: ``"layer 1: Linear 13→50"``, ``"conv2: Conv2d 6→16, 5×5"``."""
    name = re.sub(r"^layer(\d+)$", r"layer \1", layer)
    return f"{name}: {description}" if description else name


def caption(seeds: Sequence[int], full_batch: bool = False) -> str:
    """Figure caption: what the lines and the shaded bands are, over how many seeds.

    Args:
        seeds: The ``seeds`` count of each plotted record.
        full_batch: Whether the full data set is one of the batch sizes (then every
            K-FOC variant is K-FOC_optimal there, and their markers coincide).
    """
    counts = sorted(set(seeds))
    if len(counts) == 1:
        over = f"the {counts[0]} seeds 0–{counts[0] - 1}" if counts[0] > 1 else "1 seed (0)"
    else:
        over = f"{counts[0]}–{counts[-1]} seeds"
    text = (
        f"Lines: mean over {over}; shaded bands: minimum to maximum over the same seeds "
        "(none for the paper's split). K-FAC, K-FOC_optimal and the diagonal do not "
        "depend on the batch size."
    )
    if full_batch:
        text += " At the full batch size (one batch) every K-FOC variant is K-FOC_optimal."
    return text


def plot_dataset(
    results: list[dict],
    dataset: str,
    num: int,
    out: Path,
    layers: dict[str, str] | None = None,
) -> Path:
    """Write ``figure_<dataset>.png``: one panel per layer, mean line and min–max band.

    Lines are the means over seeds, the shaded bands the minimum to maximum over the
    same seeds (said in the caption under the panels, with the number of seeds). The y
    axis starts slightly below 0, and every point has a marker, so that estimators
    whose error is 0 stay visible; a panel where an estimator is exact (error
    ``≤ ZERO`` for every seed and batch size) says so under its title. The legend is
    below the panels, off the data.

    Args:
        results: Summary records (``error_mean``/``error_min``/``error_max``/``seeds``).
        dataset: Which data set to plot.
        num: Its number of samples (the "full" batch size).
        out: Output directory.
        layers: Layer name → description of its weight (e.g. ``"Linear 13→50"``) for
            the panel titles; ``None``: the paper's model's, when ``dataset`` is one of
            the paper's data sets.

    Returns:
        The written file.
    """
    records = [r for r in results if r["dataset"] == dataset]
    if layers is None:
        layers = _paper_layers(dataset)
    names = list(dict.fromkeys(r["layer"] for r in records))
    sizes = sorted({r["batch_size"] for r in records})
    top = max([1.0] + [r["error_max"] for r in records])
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4.8), squeeze=False)
    handles = {}
    for ax, layer in zip(axes[0], names):
        exact = []
        for method, (label, colour, style, marker) in STYLE.items():
            rows = sorted(
                (r for r in records if r["layer"] == layer and r["method"] == method),
                key=lambda r: r["batch_size"],
            )
            if not rows:
                continue
            x = [r["batch_size"] for r in rows]
            thin = method == "kfoc_approx_paper"
            (line,) = ax.plot(
                x,
                [r["error_mean"] for r in rows],
                style,
                color=colour,
                lw=1.5 if thin else 2.0,
                zorder=3 if thin else 2,
                marker=marker,
                markersize=7 if marker == "x" else 5,
                markerfacecolor="none" if marker == "o" and method == "kfoc_running" else colour,
                markeredgewidth=1.5,
                label=label,
                clip_on=False,
            )
            handles.setdefault(label, line)
            if method != "kfoc_approx_paper":
                ax.fill_between(
                    x,
                    [r["error_min"] for r in rows],
                    [r["error_max"] for r in rows],
                    color=colour,
                    alpha=0.15,
                    lw=0,
                )
            if method != "kfoc_approx_paper" and max(r["error_max"] for r in rows) <= ZERO:
                exact.append((label, max(r["error_max"] for r in rows)))
        ax.set_xscale("log")
        ax.set_xticks(sizes)
        ax.set_xticklabels([f"full\n({s})" if s == num else str(s) for s in sizes])
        ax.minorticks_off()
        ax.set_xlabel("batch size")
        ax.set_ylabel("relative Frobenius error")
        ax.set_ylim(Y_BOTTOM, 1.05 * top)
        title = layer_title(layer, layers.get(layer))
        if exact:
            worst = max(value for _, value in exact)
            labels = ", ".join(label for label, _ in exact)
            title += f"\n{labels}: 0 up to rounding (≤ {worst:.0e})"
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{NAMES.get(dataset, dataset)} ({num} samples)", fontsize=11)
    # below the panels: the legend (one row when it fits), then the caption
    width = fig.get_figwidth()
    text = caption([r["seeds"] for r in records], full_batch=num in sizes)
    text = textwrap.fill(text, width=int(14 * width))
    rows = 1 if width >= 9 else 2
    bottom = (0.3 * rows + 0.16 * (text.count("\n") + 1) + 0.15) / fig.get_figheight()
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.legend(
        handles.values(),
        handles.keys(),
        loc="upper center",
        bbox_to_anchor=(0.5, bottom),
        ncol=math.ceil(len(handles) / rows),
        fontsize=8.5,
        frameon=False,
    )
    fig.text(0.5, 0.02, text, ha="center", va="bottom", fontsize=8)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"figure_{dataset}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _paper_layers(dataset: str) -> dict[str, str]:
    from data import INPUT_SHAPES
    from models import paper_layers

    return paper_layers(dataset) if dataset in INPUT_SHAPES else {}


# --------------------------------------------------------------------------------------
# Command line: redraw figures from a results file
# --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of ``python integration/plots.py`` (nothing runs)."""
    import cli
    from data import DATASETS

    parser = argparse.ArgumentParser(
        prog="plots.py",
        description=__doc__.split("\n\n")[0]
        + " Redraw the figures of integration/paper.py from its results.json.",
        epilog="Example: python integration/plots.py integration/reference/paper_results.json "
        "--datasets boston mnist --out docs",
        formatter_class=cli.HelpFormatter,
    )
    parser.add_argument(
        "results",
        type=cli.existing_file,
        metavar="RESULTS",
        help="results.json of integration/paper.py (summary records)",
    )
    parser.add_argument(
        "--meta",
        type=cli.existing_file,
        default=None,
        help="meta.json of the same run, for the sample counts and layer shapes (default: "
        "meta.json beside RESULTS if there is one, else the full data sets and the "
        "paper's models)",
    )
    parser.add_argument(
        "--datasets",
        nargs="+",
        choices=DATASETS,
        default=None,
        help="data sets to plot (default: every data set in RESULTS)",
    )
    parser.add_argument(
        "--out",
        type=cli.directory,
        default=None,
        help="output directory of figure_<dataset>.png (default: the directory of RESULTS)",
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line; ``args.records``/``args.meta_data`` are loaded."""
    import cli

    parser = build_parser()
    args = parser.parse_args(argv)
    cli.reject_duplicates(parser, "--datasets", args.datasets)
    try:
        args.records = json.loads(args.results.read_text())
        present = list(dict.fromkeys(r["dataset"] for r in args.records))
    except (ValueError, TypeError, KeyError):
        parser.error(f"argument RESULTS: {str(args.results)!r} is not a results.json of paper.py")
    missing = [d for d in args.datasets or () if d not in present]
    if missing:
        parser.error(
            f"argument --datasets: {', '.join(missing)} not in {args.results} "
            f"(it has: {', '.join(present)})"
        )
    args.datasets = args.datasets or present
    if args.meta is None and (args.results.parent / "meta.json").is_file():
        args.meta = args.results.parent / "meta.json"
    args.meta_data = json.loads(args.meta.read_text()) if args.meta is not None else None
    if args.out is None:
        args.out = args.results.parent
    return args


def samples_and_layers(
    records: list[dict], dataset: str, meta: dict | None
) -> tuple[int, dict[str, str] | None]:
    """Sample count and layer descriptions of a data set in a run.

    From ``meta.json`` when given (``datasets.<name>.samples`` and ``.layers``); else the
    full data set's size if the run's batch sizes are those of the full set, else the
    largest batch size (a subset run), and the paper's model's layers.
    """
    info = (meta or {}).get("datasets", {}).get(dataset, {})
    num = info.get("samples")
    if num is None:
        from data import NUM_SAMPLES
        from paper import batch_sizes

        sizes = sorted({r["batch_size"] for r in records if r["dataset"] == dataset})
        full = NUM_SAMPLES.get(dataset)
        num = full if full is not None and batch_sizes(dataset, full) == sizes else max(sizes)
    return num, info.get("layers")


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Redraw ``figure_<dataset>.png`` for each selected data set; return the files."""
    args = parse_args(argv)
    paths = []
    for dataset in args.datasets:
        num, layers = samples_and_layers(args.records, dataset, args.meta_data)
        paths.append(plot_dataset(args.records, dataset, num, args.out, layers))
        print(paths[-1])
    return paths


if __name__ == "__main__":
    main()
