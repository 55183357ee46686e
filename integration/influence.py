"""Do K-FOC and EK-FOC attribute better? The linear datamodeling score (LDS) of each curvature.

The protocol of the TRAK and kronfluence papers (``integration/influence_study/lds.py``
has the details): per problem and repeat, a full model trained by its recipe; per
method its influence scores ``g_testᵀ (B + λ)⁻¹ g_train`` of every test × training
pair (:class:`kfoc_backpack.Influence`); ``M`` random halves of the training set, each
trained by the same recipe from several seeds; the LDS — Spearman's correlation over
the subsets between the scores' predicted measurement and the measured one, averaged
over the test inputs. Repeated over seeds of the whole procedure: mean ± standard error,
paired differences (EK-FOC − EK-FAC, K-FOC − K-FAC), a damping sweep, seconds per
method.

Problems (``integration/influence_study/problems.py``): the UCI sets with the paper's
MLP (squared error measured), the MNIST subset with LeNet-5 and as 49 patch tokens
through a transformer of token-shared ``Linear`` layers (margin measured). Methods:
identity, K-FAC, K-FOC, EK-FAC, EK-FOC (exact GGN), the exact dense GGN where it fits,
and kronfluence 1.0.1's own EK-FAC where kronfluence is installed (it needs
torchvision: the zoo's environment).

Usage::

    python integration/influence.py                 # full study (writes results/influence/)
    python integration/influence.py --quick         # smoke test, under 5 minutes
    python integration/influence.py --problems boston mnist --subsets 100 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import cli
import torch
from influence_study.lds import DEFAULT_DAMPING, METHODS, run_repeat
from influence_study.problems import PROBLEMS, load_problem
from influence_study.report import markdown, paired, plot, summarize
from tqdm import tqdm

import kfoc_backpack  # noqa: F401 - registers the structures

QUICK = {"subsets": 8, "seeds": 2, "repeats": 1, "train": 200, "test": 20}
TRAIN_CAP = {"boston": None, "concrete": None, "energy": None, "mnist": 1000, "tokens": 1000}
"""Training inputs per problem (``None``: all that the test split leaves)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument("--problems", nargs="+", choices=PROBLEMS, default=list(PROBLEMS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument(
        "--subsets", type=cli.int_at_least(2), default=50, help="random halves M per repeat"
    )
    parser.add_argument(
        "--seeds", type=cli.positive_int, default=2, help="trainings per subset (averaged)"
    )
    parser.add_argument(
        "--repeats", type=cli.positive_int, default=3, help="repeats of the whole procedure"
    )
    parser.add_argument(
        "--train",
        type=cli.positive_int,
        default=None,
        help="cap on training inputs (default: all for UCI, 1000 for MNIST)",
    )
    parser.add_argument("--test", type=cli.positive_int, default=100, help="test inputs")
    parser.add_argument(
        "--dampings",
        nargs="+",
        type=cli.nonnegative_float,
        default=[0.001, 0.01, DEFAULT_DAMPING, 1.0],
        help="damping factors (× each block's mean eigenvalue); must include 0.1",
    )
    parser.add_argument(
        "--chunk", type=cli.positive_int, default=50, help="subset models trained at once"
    )
    parser.add_argument("--threads", type=cli.positive_int, default=1, help="torch threads")
    parser.add_argument("--quick", action="store_true", help="smoke-test settings")
    parser.add_argument("--out", type=Path, default=Path("results/influence"))
    cli.add_data_dir(parser)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.reject_together(parser, argv, "--quick", ["--subsets", "--seeds", "--repeats"])
    if DEFAULT_DAMPING not in args.dampings:
        parser.error(f"argument --dampings: must include {DEFAULT_DAMPING}")
    if args.quick:
        for key in ("subsets", "seeds", "repeats"):
            setattr(args, key, QUICK[key])
        args.train = args.train or QUICK["train"]
        args.test = min(args.test, QUICK["test"])
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    cli.quiet_library_warnings()
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    records = []
    started = time.perf_counter()
    jobs = [(p, k) for p in args.problems for k in range(args.repeats)]
    for problem_name, repeat in tqdm(jobs, desc="problem × repeat"):
        cap = args.train if args.train is not None else TRAIN_CAP[problem_name]
        problem = load_problem(problem_name, 300 + repeat, cap, args.test, args.data_dir)
        records += run_repeat(
            problem,
            repeat,
            args.methods,
            args.dampings,
            args.subsets,
            args.seeds,
            args.chunk,
        )
    summary = summarize(records)
    pairs = paired(records)
    text = markdown(summary, pairs)
    command = "python integration/influence.py " + " ".join(argv or [])
    result = {
        "command": command.strip(),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "threads": args.threads,
            "torch": torch.__version__,
        },
        "settings": {
            key: getattr(args, key)
            for key in ("problems", "methods", "subsets", "seeds", "repeats", "train", "test")
        }
        | {"dampings": list(args.dampings)},
        "seconds": time.perf_counter() - started,
        "records": records,
        "summary": summary,
        "paired": pairs,
    }
    cli.write_report(args.out, "influence", result, text)
    figure = plot(summary, args.out)
    if figure is not None:
        print(f"figure: {figure}")
    (args.out / "influence.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
