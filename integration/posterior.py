"""Does K-FOC, or its eigenvalue correction, give a better Laplace posterior than K-FAC.

For every data set and seed: split the data (random 90/10 train/test, and 10 % of the
training part held out for validation), train the paper's model to its MAP estimate
once (MLP-50 on the UCI sets, LeNet-5 on the MNIST subset; ``integration/models.py``),
and put every Laplace posterior on that same MAP model:

* ``map`` — no posterior (the MAP predictive; its records have ``prior_fit`` and
  ``curvature`` ``"none"`` and ``null`` marginal likelihood and fit time);
* ``diag`` — laplace-torch ``diag`` with ``BackPackGGN`` (the exact GGN diagonal; the
  default backend forms every per-sample Jacobian for it, minutes per LeNet-5 fit);
* ``kron`` — laplace-torch ``kron`` with its default backend (curvlinops' K-FAC);
* ``kron_backpack`` — ``kron`` with ``BackPackGGN`` (BackPACK's K-FLR / K-FAC);
* ``kfoc_approx``, ``kfoc_running``, ``kfoc_optimal`` — ``hessian_structure="kfoc"``
  with that ``aggregation``;
* ``ekfoc`` — ``hessian_structure="ekfoc"``: the eigenbasis of K-FOC's factors
  (``"running"``) with the data set's own eigenvalues in it;
* ``ekfac`` — ``hessian_structure="ekfac"``: the same correction in K-FAC's basis
  (EK-FAC);
* ``full`` — laplace-torch ``full`` (exact GGN), where it fits in memory (the MLPs;
  on LeNet-5 it is skipped, and the reason is written to ``meta.json`` and the table).

Training is ``integration/models.py``'s (Adam, no weight decay, as in the paper's
reproduction; ``--weight-decay`` is a diagnostic).

The Kronecker methods run with the exact GGN (``curvature="ggn"``) and with the
Monte-Carlo Fisher (``"mc"``: ``backend_kwargs={"stochastic": True}``, one sampled
label per input); ``map``/``diag``/``full`` are ``"ggn"`` only. Every method sees the
same training batches (the training batch size, in data order), and ``torch``'s seed
is reset before each fit.

Protocol, identical for every method: a scalar prior precision fitted (a) by the
marginal likelihood, ``optimize_prior_precision(method="marglik")`` (laplace-torch's
defaults: 100 Adam steps from 1), and (b) by grid search on the validation split
(41 values ``10^-4 … 10^4``, the one with the lowest validation NLL of the predictive
below; a value whose posterior cannot be factorised counts as infinitely bad, as in
laplace-torch's own grid search). The predictive is the linearised ``glm`` one, probit
for classification; regression's observation noise ``σ`` is the MAP model's training
RMSE (the maximum likelihood ``σ`` at the MAP weights), the same for every method and
both prior fits, and the predictive is ``N(f(x), Jf Σ Jfᵀ + σ²)``. Regression targets
are standardised (``integration/data.py``), so NLL and RMSE are in standardised units.

The ``glm`` predictive's variance ``diag(J P⁻¹ Jᵀ)`` is computed here from each
posterior's public factors and per-layer Jacobian factors
(``integration/posterior_study/predictive.py``), because laplace-torch's own call forms
the dense ``[N, C, P]`` Jacobians and projects each one through the posterior: on
LeNet-5 that costs about 15 s per 100 images on this machine, for every method, test set
and grid value. The result is the same predictive: ``--check-predictive`` compares it,
on seed 0, with laplace-torch's ``la(x, pred_type="glm", link_approx="probit")`` for
every method and fails if they differ.

Metrics per seed: test NLL, RMSE (regression) or accuracy, expected calibration error
(15 equal-width confidence bins) and Brier score (classification), the log marginal
likelihood at the chosen prior precision, and the fit time (``la.fit``). MNIST is also
evaluated on its test images rotated by 0°, 15°, …, 180° (the Laplace Redux shift
benchmark; bilinear rotation about the centre, background kept).

Outputs in ``--out``: ``results.json`` (one record per data set × method × curvature ×
prior fit × seed, plus records with ``"angle"`` for rotated MNIST), ``summary.json``
(mean ± standard error over seeds), ``paired.json`` (each method against its
references per seed — the K-FOC variants and ``ekfoc``/``ekfac`` against K-FAC,
``ekfoc`` against ``kfoc_running`` and ``ekfac``, the Kronecker posteriors against
``full``: wins, mean difference and its standard error), ``table.md``, ``meta.json`` and
``figure_posterior_*.png``.

This script is the command line; the code is in ``integration/posterior_study/``
(``metrics``, ``predictive``, ``protocol``, ``report``, ``figures``: its ``__init__``
says which module holds what).

Usage::

    python integration/posterior.py                      # full run (10 seeds)
    python integration/posterior.py --quick --out DIR    # minutes: 3 seeds, subsets
    python integration/posterior.py --datasets boston --methods kron kfoc_running
    python integration/posterior.py --replot DIR/results.json --out DIR   # table, figures
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import cli
import torch
from data import DATASETS
from posterior_study.protocol import (
    CURVATURES,
    METHODS,
    PRIOR_FITS,
    build_config,
    run,
)
from posterior_study.report import write_outputs

# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser (nothing runs; :func:`parse_args` adds the checks)."""
    parser = argparse.ArgumentParser(
        prog="posterior.py",
        description=__doc__.split("\n\n")[0]
        + "\n\nK-FOC and K-FAC Laplace posteriors (and MAP, diag, full) on the same MAP "
        "models:\ntest NLL, RMSE/accuracy, ECE, Brier, log marginal likelihood, rotated "
        "MNIST.",
        epilog="Usage examples:\n" + __doc__.split("Usage::\n\n")[1].rstrip(),
        formatter_class=cli.HelpFormatter,
    )
    parser.add_argument(
        "--out",
        type=cli.directory,
        default="results/posterior",
        metavar="DIR",
        help="output directory",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a run of minutes: 3 seeds, 1000 MNIST images, 3 LeNet-5 epochs; --seeds, "
        "--subset and --epochs given explicitly take precedence",
    )
    parser.add_argument(
        "--seeds",
        metavar="N",
        type=cli.positive_int,
        default=None,
        help="number of seeds, 0 … N−1 (default: 10; 3 with --quick)",
    )
    parser.add_argument(
        "--datasets",
        nargs="+",
        choices=DATASETS,
        default=list(DATASETS),
        metavar="NAME",
        help=f"data sets, from: {' '.join(DATASETS)}",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=list(METHODS),
        metavar="NAME",
        help=f"methods, from: {' '.join(METHODS)} (the paired comparison needs kron and a "
        "kfoc_* method)",
    )
    parser.add_argument(
        "--curvatures",
        nargs="+",
        choices=CURVATURES,
        default=list(CURVATURES),
        metavar="NAME",
        help="curvature of the Kronecker methods: ggn (exact GGN), mc (Monte-Carlo "
        "Fisher); diag and full run with ggn only",
    )
    parser.add_argument(
        "--prior-fits",
        nargs="+",
        choices=PRIOR_FITS,
        default=list(PRIOR_FITS),
        metavar="NAME",
        help="prior-precision fits: marglik (marginal likelihood), gridsearch (validation NLL)",
    )
    cli.add_data_dir(parser)
    parser.add_argument(
        "--subset",
        metavar="N",
        type=cli.int_at_least(30),
        default=None,
        help="samples per data set before the split, a fixed random subset (default: all; "
        "with --quick 1000 MNIST images)",
    )
    parser.add_argument(
        "--epochs",
        metavar="N",
        type=cli.nonnegative_int,
        default=None,
        help="training epochs of every model, 0: untrained (default: 40 for the MLPs, 10 "
        "for LeNet-5; 3 for LeNet-5 with --quick)",
    )
    parser.add_argument(
        "--check-predictive",
        metavar="N",
        type=cli.nonnegative_int,
        default=8,
        help="compare the glm predictive with laplace-torch's own on N test inputs of "
        "seed 0, for every method (fails if they differ); 0: no check",
    )
    parser.add_argument(
        "--weight-decay",
        metavar="WD",
        type=cli.nonnegative_float,
        default=0.0,
        help="Adam weight decay of the MAP training (diagnostic; 0: integration/models.py's "
        "training, as in the paper's reproduction)",
    )
    parser.add_argument(
        "--threads",
        metavar="N",
        type=cli.positive_int,
        default=1,
        help="torch CPU threads (the Jacobians and fits are many small operations; on a "
        "busy 2-core machine 2 threads made them 6-13× slower than 1)",
    )
    parser.add_argument(
        "--replot",
        metavar="RESULTS",
        type=cli.existing_file,
        default=None,
        help="redraw table.md and the figures of an earlier run's results.json into --out "
        "(its meta.json is read when it lies beside), without running anything (default: "
        "none, run the comparison)",
    )
    return parser


RUN_FLAGS = [
    "--quick",
    "--seeds",
    "--datasets",
    "--methods",
    "--curvatures",
    "--prior-fits",
    "--data-dir",
    "--subset",
    "--epochs",
    "--check-predictive",
    "--weight-decay",
]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line (exit status 2 and argparse's message if bad).

    Besides each flag's own type and choices: no value twice in a multi-valued flag;
    ``--replot`` only with ``--out`` and ``--threads`` (it runs nothing).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag, values in (
        ("--datasets", args.datasets),
        ("--methods", args.methods),
        ("--curvatures", args.curvatures),
        ("--prior-fits", args.prior_fits),
    ):
        cli.reject_duplicates(parser, flag, values)
    cli.reject_together(parser, argv, "--replot", RUN_FLAGS, "--replot runs nothing")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the comparison (or redraw one); write results, summaries, table and figures."""
    cli.quiet_library_warnings()
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        if args.replot is not None:
            records = json.loads(Path(args.replot).read_text())
            meta_path = Path(args.replot).with_name("meta.json")
            meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
            return write_outputs(records, Path(args.out), meta, replot=True)
        config = build_config(args)
        records, meta = run(config)
        return write_outputs(records, config.out, meta)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
