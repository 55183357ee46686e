"""Grouped convolutions: the coupled K-FOC, one Kronecker product per group, and K-FAC.

A grouped convolution's weight (``C_out × C_in/groups·Πkernel``) has rows that see only
their group's inputs. Three structures of its block ``F``, measured on every grouped
layer of the zoo's models (first batch, exact GGN):

* **coupled** (``grouped="coupled"``, the default): one ``L ⊗ R`` over all rows (a
  dense ``C_out × C_out`` output-side factor, one input-side factor shared by the
  groups);
* **per group** (``grouped="per-group"``): the block-diagonal of one optimal
  ``L_g ⊗ R_g`` per group (each group's rows with its own inputs); for depthwise layers
  (one row per group) each channel's exact ``Πkernel × Πkernel`` block. Its squared
  error is ``‖F‖² − Σ_g ‖F_gg‖² + Σ_g ‖F_gg − L_g ⊗ R_g‖²`` (the cross-group blocks
  dropped);
* **K-FAC**: laplace-torch's ``kron`` (the input factor averaged over the groups).

Errors are relative Frobenius errors in float64 from the per-sample matrices (``F`` is
never formed); solve times in float32 (what users run), one thread, of the package's
own solves of each structure (``GroupedLayerTerms``: per group one after the other, the
depthwise blocks in one product). Usage (the zoo's
environment, see ``integration/zoo.py``)::

    python integration/grouped.py --models regnet_y_400mf efficientnet_b0 --out results/grouped
"""

from __future__ import annotations

import time

import stopping
import torch
import tqdm
import zoo

from kfoc_backpack import Grouped
from kfoc_backpack.collect import GroupedLayerTerms
from kfoc_backpack.solver import SampleTerms, SolverOptions


def per_group_error(terms: GroupedLayerTerms, block) -> float:
    """``‖F − blockdiag_g(L_g ⊗ R_g)‖ / ‖F‖``: the groups' errors and the dropped blocks."""
    norm_sq = float(SampleTerms(terms.terms.coupled()).norm_sq())
    error_sq = norm_sq
    for g in range(terms.terms.groups):
        group = terms.terms.group(g)
        error = float(group.error(block.left[g], block.right[g], relative=False))
        error_sq += error**2 - float(group.norm_sq())
    return max(error_sq, 0.0) ** 0.5 / norm_sq**0.5


def timed(solve) -> float:
    """Milliseconds of ``solve()`` (after one warm-up call)."""
    solve()
    start = time.perf_counter()
    solve()
    return 1e3 * (time.perf_counter() - start)


def layer_rows(
    name: str, batch: int, options: SolverOptions, image_size: int = zoo.IMAGE_SIZE
) -> list[dict]:
    case = zoo.make(name, batch, 1, image_size=image_size)
    low = grouped_terms(case, torch.float32)
    high = grouped_terms(case, torch.float64)
    rows = []
    for weight, value in tqdm.tqdm(low.items(), desc=name):
        exact = high[weight]
        coupled = exact.with_structure(Grouped.COUPLED)
        factors = coupled.solve(options)
        norm_sq = coupled.terms.norm_sq()
        sizes = value.sizes
        groups, out_features, in_features = sizes.groups, sizes.out_features, sizes.in_features
        rows.append(
            {
                "model": name,
                "weight": weight,
                "sizes": list(sizes),
                "coupled_error": stopping.relative_error(
                    coupled.terms, norm_sq, factors.left, factors.right
                ),
                "per_group_error": per_group_error(exact, exact.kfoc_block(options)),
                "kfac_error": stopping.relative_error(coupled.terms, norm_sq, *exact.kfac),
                "coupled_ms": timed(
                    lambda v=value: v.with_structure(Grouped.COUPLED).solve(options)
                ),
                "per_group_ms": timed(lambda v=value: v.kfoc_block(options)),
                "coupled_factor_entries": out_features**2 + in_features**2,
                "per_group_factor_entries": groups
                * ((out_features // groups) ** 2 + in_features**2),
            }
        )
    return rows


def grouped_terms(case: zoo.Case, dtype: torch.dtype) -> dict[str, GroupedLayerTerms]:
    """Return the first batch's terms of every grouped weight, in ``dtype`` (K-FAC's too)."""
    weights = stopping.collect(case, dtype, Grouped.PER_GROUP)
    return {n: t for n, t in weights.items() if isinstance(t, GroupedLayerTerms)}


def table(rows: list[dict]) -> str:
    lines = [
        "| model | layer | C_out × I, groups | coupled error | per-group error | K-FAC error "
        "| coupled ms | per-group ms |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        sizes = row["sizes"]
        lines.append(
            f"| {row['model']} | {row['weight']} | {sizes[3]} × {sizes[4]}, {sizes[5]} "
            f"| {row['coupled_error']:.4f} | {row['per_group_error']:.4f} "
            f"| {row['kfac_error']:.4f} | {row['coupled_ms']:.1f} | {row['per_group_ms']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = stopping.build_parser(__doc__.split("\n\n")[0], "results/grouped")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        rows += layer_rows(name, args.batch, SolverOptions(), args.image_size)
    return stopping.save(args, "grouped", argv, {"layers": rows}, table(rows))


if __name__ == "__main__":
    main()
