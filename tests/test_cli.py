"""Command lines of the scripts in integration/: bad values exit with status 2 and name the flag.

Only the parsers run (``parse_args``/``build_parser``): nothing trains or times.
"""

from __future__ import annotations

import argparse
import json
import warnings

import benchmark
import cli
import convergence
import paper
import plots
import pytest
import torch

pytest.importorskip("matplotlib")

REFERENCE = "integration/reference/paper_results.json"


def _rejected(parse, argv, flag, capsys, *, also=()):
    """``parse(argv)`` exits with status 2 and one error line naming ``flag``."""
    with pytest.raises(SystemExit) as info:
        parse(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert "error: argument " in line and flag in line, err
    for text in also:
        assert text in line, err
    return line


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def one_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a_file.txt"
    path.write_text("not a directory")
    return str(path)


# --------------------------------------------------------------------------------------
# integration/paper.py
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "flag", "allowed"),
    [
        (["--seeds", "0"], "--seeds", "positive integer"),
        (["--seeds", "-3"], "--seeds", "positive integer"),
        (["--seeds", "two"], "--seeds", "positive integer"),
        (["--subset", "0"], "--subset", "positive integer"),
        (["--subset", "-5"], "--subset", "positive integer"),
        (["--subset", "1.5"], "--subset", "positive integer"),
        (["--epochs", "-1"], "--epochs", "non-negative integer"),
        (["--runtime-repeats", "-1"], "--runtime-repeats", "non-negative integer"),
        (["--threads", "0"], "--threads", "positive integer"),
        (["--device", "tpu"], "--device", "cpu, cuda, cuda:N"),
        (["--device", "mps"], "--device", "cpu, cuda, cuda:N"),
        (["--datasets", "cifar"], "--datasets", "boston"),
        (["--datasets", "boston", "boston"], "--datasets", "more than once"),
        (["--fisher", "gauss"], "--fisher", "mc"),
        (["--activation", "gelu"], "--activation", "relu"),
        (["--fisher", "exact"], "--fisher", "mnist"),
        (["--with-bias"], "--with-bias", "mnist"),
        (["--with-bias", "--datasets", "boston", "mnist"], "--with-bias", "boston"),
        (["--activation", "tanh", "--datasets", "mnist"], "--activation", "mnist"),
    ],
)
def test_paper_rejects_bad_values(argv, flag, allowed, capsys):
    _rejected(paper.parse_args, argv, flag, capsys, also=[allowed])


def test_paper_rejects_unavailable_cuda(no_cuda, capsys):
    for device in ("cuda", "cuda:0"):
        _rejected(paper.parse_args, ["--device", device], "--device", capsys, also=["not avail"])


def test_paper_rejects_missing_cuda_index(one_cuda, capsys):
    assert paper.parse_args(["--device", "cuda:0"]).device == "cuda:0"
    _rejected(paper.parse_args, ["--device", "cuda:1"], "--device", capsys, also=["1 CUDA"])


@pytest.mark.parametrize("flag", ["--out", "--data-dir"])
def test_paper_rejects_a_file_as_directory(flag, a_file, capsys):
    _rejected(paper.parse_args, [flag, a_file], flag, capsys, also=["not a directory"])


def test_paper_accepts_good_values_and_keeps_defaults():
    args = paper.parse_args([])
    assert args.seeds is None and args.subset is None and args.epochs is None
    assert args.runtime_repeats == 3 and args.threads == 1 and args.device == "cpu"
    config = paper.build_config(args)
    assert config.seeds == 10 and config.runtime_repeats == 3
    assert config.subset == dict.fromkeys(paper.DATASETS)
    argv = ["--epochs", "0", "--runtime-repeats", "0", "--subset", "1", "--datasets", "boston",
            "--with-bias", "--fisher", "exact"]  # fmt: skip
    args = paper.parse_args(argv)
    assert (args.epochs, args.runtime_repeats, args.subset) == (0, 0, 1)
    # --quick sets defaults; explicitly given --seeds/--subset/--epochs take precedence
    quick = paper.build_config(paper.parse_args(["--quick"]))
    assert quick.seeds == 3 and quick.subset["mnist"] == 1000
    refined = paper.build_config(paper.parse_args(["--quick", "--seeds", "1", "--subset", "50"]))
    assert refined.seeds == 1 and set(refined.subset.values()) == {50} and refined.quick


# --------------------------------------------------------------------------------------
# integration/benchmark.py
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "flag", "allowed"),
    [
        (["--repeats", "2"], "--repeats", "≥ 5"),
        (["--repeats", "0"], "--repeats", "≥ 5"),
        (["--repeats", "x"], "--repeats", "≥ 5"),
        (["--warmup", "-1"], "--warmup", "non-negative integer"),
        (["--device", "tpu"], "--device", "cpu, cuda, cuda:N"),
        (["--models", "resnet"], "--models", "lenet5"),
        (["--models", "lenet5", "lenet5"], "--models", "more than once"),
        (["--batch-sizes", "0"], "--batch-sizes", "positive integer"),
        (["--batch-sizes", "32", "-8"], "--batch-sizes", "positive integer"),
        (["--batch-sizes", "32", "32"], "--batch-sizes", "more than once"),
        (["--quick", "--repeats", "7"], "--repeats", "--quick"),
        (["--repeats", "9", "--quick"], "--repeats", "--quick"),
        (["--quick", "--repeats=7"], "--repeats", "--quick"),
        (["--quick", "--rep", "7"], "--repeats", "--quick"),
        (["--quick", "--batch-sizes", "4"], "--batch-sizes", "--quick"),
    ],
)
def test_benchmark_rejects_bad_values(argv, flag, allowed, capsys):
    _rejected(benchmark.parse_args, argv, flag, capsys, also=[allowed])


def test_benchmark_rejects_unavailable_cuda(no_cuda, capsys):
    _rejected(benchmark.parse_args, ["--device", "cuda"], "--device", capsys, also=["no CUDA"])


def test_benchmark_rejects_a_file_as_out(a_file, capsys):
    _rejected(benchmark.parse_args, ["--out", a_file], "--out", capsys)


def test_benchmark_quick_and_explicit_values():
    quick = benchmark.parse_args(["--quick", "--warmup", "0", "--models", "lenet5"])
    assert quick.batch_sizes == [32] and quick.repeats == 3 and quick.warmup == 0
    args = benchmark.parse_args(["--repeats", "5", "--batch-sizes", "4", "8"])
    assert args.repeats == 5 and args.batch_sizes == [4, 8] and not args.quick
    assert benchmark.parse_args([]).repeats == 7


# --------------------------------------------------------------------------------------
# integration/convergence.py and integration/plots.py
# --------------------------------------------------------------------------------------


def test_convergence_takes_no_arguments(capsys):
    assert vars(convergence.build_parser().parse_args([])) == {}
    with pytest.raises(SystemExit) as info:
        convergence.build_parser().parse_args(["--batch", "32"])
    assert info.value.code == 2 and "--batch" in capsys.readouterr().err


def test_plots_rejects_bad_values(tmp_path, a_file, capsys):
    _rejected(plots.parse_args, [str(tmp_path / "none.json")], "RESULTS", capsys,
              also=["no such file"])  # fmt: skip
    _rejected(plots.parse_args, [a_file], "RESULTS", capsys, also=["not a results.json"])
    _rejected(plots.parse_args, [REFERENCE, "--datasets", "cifar"], "--datasets", capsys)
    _rejected(plots.parse_args, [REFERENCE, "--out", a_file], "--out", capsys)
    _rejected(plots.parse_args, [REFERENCE, "--meta", str(tmp_path / "m.json")], "--meta", capsys)
    subset = tmp_path / "results.json"
    records = json.loads(open(REFERENCE).read())
    subset.write_text(json.dumps([r for r in records if r["dataset"] == "boston"]))
    _rejected(plots.parse_args, [str(subset), "--datasets", "mnist"], "--datasets", capsys,
              also=["it has: boston"])  # fmt: skip
    args = plots.parse_args([REFERENCE])
    assert args.datasets == ["boston", "concrete", "energy", "mnist"]
    assert str(args.out) == "integration/reference" and args.meta is None


# --------------------------------------------------------------------------------------
# Every script: help shows the defaults
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", [paper, benchmark, convergence, plots])
def test_help_shows_every_default(module, capsys):
    parser = module.build_parser()
    formatter = cli.HelpFormatter(parser.prog)
    for action in parser._actions:
        if not action.option_strings or action.default in (False, argparse.SUPPRESS):
            continue  # positionals, switches, --help
        assert "default" in formatter._get_help_string(action), action.option_strings
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and ("(default:" in out or module is convergence)
    assert "issue" not in out


def test_help_texts_of_benchmark():
    text = benchmark.build_parser().format_help()
    for flag in ("--warmup", "--models", "--out", "--batch-sizes", "--repeats", "--quick"):
        assert flag in text
    parser = benchmark.build_parser()
    assert all(a.help for a in parser._actions)


# --------------------------------------------------------------------------------------
# integration/cli.py itself
# --------------------------------------------------------------------------------------


def test_int_types():
    assert cli.positive_int("3") == 3 and cli.nonnegative_int("0") == 0
    assert cli.int_at_least(5)("5") == 5
    for parse, bad in ((cli.positive_int, "0"), (cli.nonnegative_int, "-1"),
                       (cli.int_at_least(5), "4"), (cli.positive_int, "1e3")):  # fmt: skip
        with pytest.raises(argparse.ArgumentTypeError, match=repr(bad)):
            parse(bad)


def test_device_type(monkeypatch):
    assert cli.device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.available_devices() == ["cpu"]
    with pytest.raises(argparse.ArgumentTypeError, match="available here: cpu"):
        cli.device("cuda")
    with pytest.raises(argparse.ArgumentTypeError, match="choose from"):
        cli.device("cpu:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert cli.available_devices() == ["cpu", "cuda", "cuda:0", "cuda:1"]
    assert cli.device("cuda:1") == "cuda:1"


def test_given_options_and_reject_together(capsys):
    parser = argparse.ArgumentParser(prog="p")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--other", default="x")
    assert cli.given_options(parser, []) == set()
    assert cli.given_options(parser, ["--repeats", "7"]) == {"--repeats"}  # the default, given
    assert cli.given_options(parser, ["--rep=3", "--quick"]) == {"--repeats", "--quick"}
    cli.reject_together(parser, ["--quick", "--other", "y"], "--quick", ["--repeats"])
    cli.reject_together(parser, ["--repeats", "3"], "--quick", ["--repeats"])
    with pytest.raises(SystemExit) as info:
        cli.reject_together(parser, ["--quick", "--repeats", "7"], "--quick", ["--repeats"], "why")
    assert info.value.code == 2
    assert "p: error: argument --repeats: not allowed with argument --quick (why)" in (
        capsys.readouterr().err
    )


def test_help_formatter_shows_lists_and_skips_none():
    parser = argparse.ArgumentParser(formatter_class=cli.HelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[1, 10], help="sizes")
    parser.add_argument("--seeds", default=None, help="seeds (default: 10)")
    parser.add_argument("--ratio", default="5%", help="50%% of it")  # argparse's escape
    text = parser.format_help()
    assert "(default: 1 10)" in text and "(default: None)" not in text
    assert "50% of it (default: 5%)" in " ".join(text.split())


def test_quiet_library_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli.quiet_library_warnings()
        cli.quiet_library_warnings()
        warnings.warn("Full backward hook is firing when ...", UserWarning, stacklevel=1)
        warnings.warn("something else", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else"]


# --------------------------------------------------------------------------------------
# integration/laplace_speed.py
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--repeats", "0"], "--repeats"),
        (["--batch", "-2"], "--batch"),
        (["--batches", "0"], "--batches"),
        (["--threads", "0"], "--threads"),
        (["--models", "vgg"], "--models"),
        (["--quick", "--repeats", "3"], "--repeats"),
        (["--quick", "--batch", "16"], "--batch"),
    ],
)
def test_laplace_speed_rejects(argv, flag, capsys):
    import laplace_speed

    _rejected(laplace_speed.parse_args, argv, flag, capsys)
