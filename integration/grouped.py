"""Grouped convolutions: the coupled K-FOC, one Kronecker product per group, and K-FAC.

A grouped convolution's weight (``C_out × C_in/groups·Πkernel``) has rows that see only
their group's inputs. Three structures of its block ``F``, measured on every grouped
layer of the zoo's models (first batch, exact GGN):

* **coupled**: today's K-FOC, one ``L ⊗ R`` over all rows (a dense ``C_out × C_out``
  output-side factor, one input-side factor shared by the groups);
* **per group**: the block-diagonal of one optimal ``L_g ⊗ R_g`` per group (each group's
  rows with its own inputs); for depthwise layers (one row per group) this is each
  channel's exact ``Πkernel × Πkernel`` block. Its error is ``‖F‖² − Σ_g σ_g²`` (the
  cross-group blocks dropped, ``σ_g²`` what group ``g``'s product captures);
* **K-FAC**: laplace-torch's ``kron`` (the input factor averaged over the groups).

Errors are relative Frobenius errors in float64 from the per-sample matrices (``F`` is
never formed); solve times in float32 (what users run), one thread, the per-group solves
one after the other (the depthwise blocks in one product). Usage (the zoo's
environment, see ``integration/zoo.py``)::

    python integration/grouped.py --models regnet_y_400mf efficientnet_b0 --out results/grouped
"""

from __future__ import annotations

import time

import stopping
import torch
import tqdm
import zoo

from kfoc_backpack.solver import SampleTerms, SolverOptions


def per_group(samples: torch.Tensor, groups: int, options: SolverOptions) -> tuple[float, float]:
    """Return ``(Σ_g ‖F_gg‖², Σ_g σ_g²)`` of the per-group optima of ``[K, C_out, I]`` samples."""
    num, rows, cols = samples.shape
    split = samples.reshape(num, groups, rows // groups, cols)
    if rows == groups:  # depthwise: each channel's exact block, σ_g² = ‖F_gg‖²
        blocks = torch.einsum("kgi,kgj->gij", split[:, :, 0], split[:, :, 0])
        total = float(blocks.square().sum())
        return total, total
    norms, captured = 0.0, 0.0
    for group in range(groups):
        terms = SampleTerms(split[:, group].contiguous())
        factors = terms.solve(options)
        norm_sq = float(terms.norm_sq())
        error = float(terms.error(factors.left, factors.right, relative=False))
        norms, captured = norms + norm_sq, captured + norm_sq - error**2
    return norms, captured


def layer_rows(
    name: str, batch: int, options: SolverOptions, image_size: int = zoo.IMAGE_SIZE
) -> list[dict]:
    case = zoo.make(name, batch, 1, image_size=image_size)
    low = stopping.collect(case, torch.float32)
    high = stopping.collect(case, torch.float64)
    rows = []
    for weight, value in tqdm.tqdm(low.items(), desc=name):
        if value.sizes is None or value.sizes.groups == 1:
            continue
        groups = value.sizes.groups
        out_features, in_features = value.sizes.out_features, value.sizes.in_features
        exact = high[weight]
        samples = exact.terms.samples  # the formed route's [K, C_out, I]
        norm_sq = float(exact.terms.norm_sq())
        coupled = exact.solve(options)
        _, captured = per_group(samples, groups, options)
        start = time.perf_counter()
        value.solve(options)
        coupled_ms = 1e3 * (time.perf_counter() - start)
        start = time.perf_counter()
        per_group(value.terms.samples, groups, options)
        group_ms = 1e3 * (time.perf_counter() - start)
        rows.append(
            {
                "model": name,
                "weight": weight,
                "sizes": list(value.sizes),
                "coupled_error": float(exact.terms.error(coupled.left, coupled.right)),
                "per_group_error": max(norm_sq - captured, 0.0) ** 0.5 / norm_sq**0.5,
                "kfac_error": stopping.relative_error(exact.terms, *exact.kfac),
                "coupled_ms": coupled_ms,
                "per_group_ms": group_ms,
                "coupled_factor_entries": out_features**2 + in_features**2,
                "per_group_factor_entries": groups
                * ((out_features // groups) ** 2 + in_features**2),
            }
        )
    return rows


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
