"""Figure-1-style plots: relative Frobenius error against batch size, per layer."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

STYLE = {
    # method: (label, colour, line style) — the paper's colours where it has the method
    "diag": ("diagonal", "tab:orange", "-"),
    "kfac": ("K-FAC", "tab:green", "-"),
    "kfoc_approx": ("K-FOC_approx", "tab:blue", "-"),
    "kfoc_running": ("K-FOC_running", "tab:red", "-"),
    "kfoc_optimal": ("K-FOC_optimal", "tab:purple", "--"),
    "kfoc_approx_paper": ("K-FOC_approx (paper's split)", "tab:blue", ":"),
}


def plot_dataset(results: list[dict], dataset: str, num: int, out: Path) -> Path:
    """Write ``figure_<dataset>.png``: one panel per layer, mean line and min–max band.

    Args:
        results: Summary records (``error_mean``/``error_min``/``error_max``).
        dataset: Which data set to plot.
        num: Its number of samples (the "full" batch size).
        out: Output directory.

    Returns:
        The written file.
    """
    records = [r for r in results if r["dataset"] == dataset]
    layers = list(dict.fromkeys(r["layer"] for r in records))
    sizes = sorted({r["batch_size"] for r in records})
    fig, axes = plt.subplots(1, len(layers), figsize=(5 * len(layers), 3.8), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        for method, (label, colour, style) in STYLE.items():
            rows = sorted(
                (r for r in records if r["layer"] == layer and r["method"] == method),
                key=lambda r: r["batch_size"],
            )
            if not rows:
                continue
            x = [r["batch_size"] for r in rows]
            width = 1.0 if method == "kfoc_approx_paper" else 2.0
            ax.plot(x, [r["error_mean"] for r in rows], style, color=colour, lw=width, label=label)
            if method != "kfoc_approx_paper":
                ax.fill_between(
                    x,
                    [r["error_min"] for r in rows],
                    [r["error_max"] for r in rows],
                    color=colour,
                    alpha=0.15,
                    lw=0,
                )
        ax.set_xscale("log")
        ax.set_xticks(sizes)
        ax.set_xticklabels([f"full\n({s})" if s == num else str(s) for s in sizes])
        ax.minorticks_off()
        ax.set_xlabel("batch size")
        ax.set_ylabel("relative Frobenius error")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{dataset}: {layer}")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"figure_{dataset}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
