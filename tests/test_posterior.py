"""Tests of integration/posterior.py and integration/posterior_study/: metrics, splits,
rotations, the glm predictive against laplace-torch's own, the summaries, the command line
and a smoke run."""

import argparse
import json
import math
import warnings

import cli
import posterior
import pytest
import torch
from posterior_study.metrics import (
    accuracy,
    brier_score,
    classification_metrics,
    classification_nll,
    expected_calibration_error,
    gaussian_nll,
    regression_metrics,
    rmse,
)
from posterior_study.predictive import (
    PREDICTIVE_TOL,
    FunctionalVariance,
    check_against_laplace,
    jacobian_features,
    predictive,
)
from posterior_study.protocol import (
    ANGLES,
    KRON_METHODS,
    METHODS,
    MethodSpec,
    build_config,
    make_laplace,
    method_specs,
    rotate_images,
    split_indices,
)
from posterior_study.report import paired_comparison, summarize
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

# --------------------------------------------------------------------------------------
# Metrics on hand-computed inputs
# --------------------------------------------------------------------------------------

PROBS = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.8, 0.2]], dtype=torch.float64)
TARGETS = torch.tensor([0, 1, 1, 0])  # predictions 0, 0, 1, 0: correct, wrong, correct, correct


def test_ece_hand_computed():
    # 4 bins with edges .25/.5/.75/1: bin 3 holds .6 (wrong) and .7 (correct):
    # |0.5 − 0.65| · 2/4; bin 4 holds .9 and .8 (both correct): |1 − 0.85| · 2/4.
    ece = expected_calibration_error(PROBS, TARGETS, bins=4)
    assert ece == pytest.approx(0.15 * 0.5 + 0.15 * 0.5, abs=1e-12)
    # one bin: |accuracy − mean confidence| = |3/4 − 0.75| = 0
    assert expected_calibration_error(PROBS, TARGETS, bins=1) == pytest.approx(0, abs=1e-12)


def test_ece_bins_are_closed_on_the_right():
    # confidence 0.5 (correct) belongs to (0, 0.5], confidence 0.75 (wrong) to (0.5, 1]:
    # |1 − 0.5| · 1/2 + |0 − 0.75| · 1/2 = 0.625 (0.125 if 0.5 went to the upper bin)
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.75, 0.25, 0.0]], dtype=torch.float64)
    targets = torch.tensor([0, 1])
    ece = expected_calibration_error(probs, targets, bins=2)
    assert ece == pytest.approx(0.625, abs=1e-12)


def test_ece_extremes():
    certain = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(certain, torch.tensor([0, 1])) == 0
    assert expected_calibration_error(certain, torch.tensor([1, 0])) == 1


def test_brier_hand_computed():
    # (0.1² + 0.1²) + (0.6² + 0.6²) + (0.3² + 0.3²) + (0.2² + 0.2²), mean over 4
    expected = (0.02 + 0.72 + 0.18 + 0.08) / 4
    assert brier_score(PROBS, TARGETS) == pytest.approx(expected, abs=1e-7)
    assert brier_score(torch.eye(3), torch.arange(3)) == 0
    assert brier_score(torch.eye(2), torch.tensor([1, 0])) == 2


def test_classification_nll_and_accuracy_hand_computed():
    expected = -(math.log(0.9) + math.log(0.4) + math.log(0.7) + math.log(0.8)) / 4
    assert classification_nll(PROBS.log(), TARGETS) == pytest.approx(expected, rel=1e-6)
    assert accuracy(PROBS, TARGETS) == 0.75
    result = classification_metrics(PROBS.double().log(), TARGETS)
    assert set(result) == {"nll", "accuracy", "ece", "brier"}
    assert result["nll"] == pytest.approx(expected, rel=1e-12)
    assert result["brier"] == pytest.approx(0.25, abs=1e-12)


def test_gaussian_nll_and_rmse_hand_computed():
    mean = torch.tensor([0.0, 0.0])
    var = torch.tensor([1.0, 4.0])
    targets = torch.tensor([0.0, 2.0])
    first = 0.5 * math.log(2 * math.pi)
    second = 0.5 * math.log(8 * math.pi) + 4 / 8
    assert gaussian_nll(mean, var, targets) == pytest.approx((first + second) / 2)
    assert rmse(torch.zeros(2), torch.tensor([3.0, 4.0])) == pytest.approx(math.sqrt(12.5))
    result = regression_metrics(mean, var, targets)
    assert result == {
        "nll": pytest.approx((first + second) / 2),
        "rmse": pytest.approx(math.sqrt(2)),
    }


def test_predictive_probit_and_map():
    f_mu = torch.tensor([[1.0, -1.0, 0.5]])
    f_var = torch.tensor([[2.0, 0.0, 8 / math.pi]])
    log_probs, none = predictive("classification", f_mu, f_var)
    assert none is None
    kappa = torch.tensor([1 / math.sqrt(1 + math.pi / 4), 1.0, 1 / math.sqrt(2)])
    torch.testing.assert_close(log_probs, torch.log_softmax((kappa * f_mu).double(), 1))
    log_probs, _ = predictive("classification", f_mu, None)
    torch.testing.assert_close(log_probs, torch.log_softmax(f_mu.double(), 1))
    mean, var = predictive("regression", torch.tensor([[1.0], [2.0]]), None, 0.5)
    torch.testing.assert_close(var, torch.full((2,), 0.25, dtype=torch.float64))
    mean, var = predictive(
        "regression", torch.tensor([[1.0], [2.0]]), torch.tensor([[1.0], [3.0]]), 0.5
    )
    torch.testing.assert_close(mean, torch.tensor([1.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(var, torch.tensor([1.25, 3.25], dtype=torch.float64))


# --------------------------------------------------------------------------------------
# Splits and rotations
# --------------------------------------------------------------------------------------


def test_split_indices():
    train, val, test = split_indices(506, seed=3)
    assert (len(train), len(val), len(test)) == (409, 46, 51)
    together = torch.cat([train, val, test])
    assert torch.equal(together.sort().values, torch.arange(506))
    again = split_indices(506, seed=3)
    assert all(torch.equal(a, b) for a, b in zip((train, val, test), again))
    assert not torch.equal(test, split_indices(506, seed=4)[2])


def test_rotate_images():
    images = torch.randn(3, 1, 28, 28)
    assert rotate_images(images, 0, -0.4) is images
    torch.testing.assert_close(
        rotate_images(images, 90, -0.4), torch.rot90(images, 1, (2, 3)), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        rotate_images(images, 180, -0.4), images.flip(2, 3), atol=1e-4, rtol=0
    )
    # the background stays the background
    blank = torch.full((1, 1, 28, 28), -0.4)
    torch.testing.assert_close(rotate_images(blank, 45, -0.4), blank)


# --------------------------------------------------------------------------------------
# Jacobians and the glm predictive against laplace-torch
# --------------------------------------------------------------------------------------


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3, stride=2, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


def _mlp(outputs):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, outputs))


def test_jacobian_features_equal_autograd_jacobians():
    model = _cnn()
    inputs = torch.randn(5, 1, 8, 8)
    features = jacobian_features(model, inputs, chunk=2)
    params = dict(model.named_parameters())

    def f(p, x):
        return torch.func.functional_call(model, p, (x,))

    jac = torch.func.jacrev(f)(params, inputs)  # name → [N, C, *shape]
    dense = torch.cat([jac[name].flatten(2) for name in params], 2)
    ours = torch.cat([b.dense() for b in features.blocks], 2)
    torch.testing.assert_close(ours, dense, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(features.f_mu, model(inputs).detach())


CASES = (
    [("mlp", "classification", m, c) for m in KRON_METHODS for c in ("ggn", "mc")]
    + [("mlp", "classification", "diag", "ggn"), ("mlp", "classification", "full", "ggn")]
    + [("cnn", "classification", m, "ggn") for m in ("diag", "kron", "kron_backpack", "full")]
    + [("cnn", "classification", m, c) for m in ("kfoc_running", "ekfoc") for c in ("ggn", "mc")]
    + [("cnn", "classification", "ekfac", "ggn")]
    + [("mlp", "regression", m, "ggn") for m in ("diag", "kron", "kfoc_optimal", "full")]
    + [("mlp", "regression", m, "ggn") for m in ("ekfoc", "ekfac")]
)


@pytest.mark.parametrize("model_name, task, method, curvature", CASES)
def test_functional_variance_equals_laplace(model_name, task, method, curvature):
    if model_name == "cnn":
        model, inputs = _cnn(), torch.randn(48, 1, 8, 8)
    else:
        model, inputs = _mlp(3 if task == "classification" else 1), torch.randn(48, 4)
    targets = torch.randint(0, 3, (48,)) if task == "classification" else torch.randn(48, 1)
    la = make_laplace(MethodSpec(method, curvature), model, task, 0.7)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la.fit(DataLoader(TensorDataset(inputs, targets), batch_size=16))
    test = inputs[:6]
    features = jacobian_features(model, test)
    variance = FunctionalVariance(la, features)
    for prior in (0.3, 4.0):  # read at the current prior precision on every call
        la.prior_precision = prior
        Js, _ = la.backend.jacobians(test)
        expected = la.functional_variance(Js).diagonal(dim1=1, dim2=2)
        torch.testing.assert_close(variance(), expected, atol=1e-6, rtol=1e-4)
    diff = check_against_laplace(la, model, task, test, 0.7)
    assert diff <= PREDICTIVE_TOL[task]


# --------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------


def _record(method, seed, nll, prior_fit="marglik", angle=None):
    record = {
        "dataset": "boston",
        "method": method,
        "curvature": "ggn",
        "prior_fit": prior_fit,
        "seed": seed,
        "nll": nll,
        "rmse": 0.5,
        "log_marglik": -10.0 * (seed + 1),
        "fit_seconds": 0.1,
        "prior_precision": 1.0,
    }
    if angle is not None:
        record.update(dataset="mnist", angle=angle, accuracy=0.9, ece=0.1, brier=0.2)
    return record


def test_summarize_mean_and_standard_error():
    records = [_record("kron", s, v) for s, v in enumerate((1.0, 2.0, 4.0))]
    (row,) = summarize(records)
    assert row["seeds"] == 3
    assert row["nll_mean"] == pytest.approx(7 / 3)
    sd = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    assert row["nll_se"] == pytest.approx(sd / math.sqrt(3))


def test_paired_comparison():
    kron = [_record("kron", s, v) for s, v in enumerate((1.0, 2.0, 3.0, 4.0))]
    kfoc = [_record("kfoc_running", s, v) for s, v in enumerate((0.5, 2.0, 2.0, 4.5))]
    rows = paired_comparison(kron + kfoc)
    (nll,) = [r for r in rows if r["metric"] == "nll"]
    assert (nll["wins"], nll["ties"], nll["losses"]) == (2, 1, 1)
    diffs = [-0.5, 0.0, -1.0, 0.5]
    assert nll["mean_diff"] == pytest.approx(-0.25)
    assert nll["se_diff"] == pytest.approx(math.sqrt(sum((d + 0.25) ** 2 for d in diffs) / 3) / 2)
    assert nll["reference_sd"] == pytest.approx(math.sqrt(5 / 3))
    (lml,) = [r for r in rows if r["metric"] == "log_marglik"]
    assert (lml["wins"], lml["ties"], lml["losses"]) == (0, 4, 0)


def test_paired_comparison_of_rotated_sets_uses_the_mean_over_angles():
    records = [
        _record(method, 0, nll, angle=angle)
        for method, values in (("kron", (1.0, 3.0)), ("kfoc_optimal", (1.0, 2.0)))
        for angle, nll in zip((0, 90), values)
    ]
    rows = paired_comparison(records)
    (nll,) = [r for r in rows if r["metric"] == "nll" and r["dataset"] == "mnist-rotated"]
    assert nll["mean_diff"] == pytest.approx(-0.5)
    assert nll["wins"] == 1


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--seeds", "0"], "--seeds"),
        (["--seeds", "x"], "--seeds"),
        (["--datasets", "iris"], "--datasets"),
        (["--datasets", "boston", "boston"], "--datasets"),
        (["--methods", "laplace"], "--methods"),
        (["--methods", "kron", "kron"], "--methods"),
        (["--curvatures", "ef"], "--curvatures"),
        (["--prior-fits", "cv"], "--prior-fits"),
        (["--subset", "10"], "--subset"),
        (["--epochs", "-1"], "--epochs"),
        (["--threads", "0"], "--threads"),
        (["--check-predictive", "-2"], "--check-predictive"),
        (["--replot", "no/such/results.json"], "--replot"),
    ],
)
def test_bad_values_exit_2_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        posterior.parse_args(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(f"posterior.py: error: argument {flag}")
    assert sum("error:" in line for line in lines) == 1


def test_out_must_not_be_a_file(tmp_path, capsys):
    path = tmp_path / "file"
    path.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        posterior.parse_args(["--out", str(path)])
    assert exit_info.value.code == 2
    assert "argument --out" in capsys.readouterr().err


def test_replot_runs_nothing_else(tmp_path, capsys):
    results = tmp_path / "results.json"
    results.write_text("[]")
    with pytest.raises(SystemExit) as exit_info:
        posterior.parse_args(["--replot", str(results), "--seeds", "3"])
    assert exit_info.value.code == 2
    assert "argument --seeds: not allowed with argument --replot" in capsys.readouterr().err


def test_every_option_shows_its_default(capsys):
    parser = posterior.build_parser()
    formatter = cli.HelpFormatter(parser.prog)
    for action in parser._actions:
        if not action.option_strings or action.default in (False, argparse.SUPPRESS):
            continue  # switches, --help
        assert "default" in formatter._get_help_string(action), action.option_strings
    assert "issue" not in parser.format_help()


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        posterior.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for default in ("results/posterior", "ggn mc", "marglik gridsearch", "(default: 8)"):
        assert default in text


def test_quick_defaults_and_explicit_flags():
    config = build_config(posterior.parse_args(["--quick"]))
    assert config.seeds == 3 and config.subset == {
        "boston": None,
        "concrete": None,
        "energy": None,
        "mnist": 1000,
    }
    assert config.train["classification"].epochs == 3
    config = build_config(
        posterior.parse_args(["--quick", "--seeds", "4", "--subset", "300", "--epochs", "1"])
    )
    assert config.seeds == 4 and set(config.subset.values()) == {300}
    assert {c.epochs for c in config.train.values()} == {1}
    assert build_config(posterior.parse_args([])).seeds == 10


def test_method_specs():
    specs = method_specs(METHODS, ["mc"])
    assert MethodSpec("map", "none") in specs
    assert all(s.curvature == "mc" for s in specs if s.method in KRON_METHODS)
    assert not any(s.method in ("diag", "full") for s in specs)  # GGN only
    assert len(method_specs(METHODS, ["ggn", "mc"])) == 1 + 2 + 2 * 7


# --------------------------------------------------------------------------------------
# Smoke test of the script
# --------------------------------------------------------------------------------------

REQUIRED = {
    "dataset",
    "method",
    "curvature",
    "prior_fit",
    "seed",
    "nll",
    "log_marglik",
    "fit_seconds",
}


def test_smoke_run(tmp_path):
    out = tmp_path / "run"
    argv = ["--datasets", "boston", "mnist", "--seeds", "1", "--subset", "300", "--epochs", "1"]
    argv += ["--methods", "map", "kron", "kfoc_running", "ekfoc", "full"]
    argv += ["--check-predictive", "2"]
    argv += ["--out", str(out), "--threads", "1"]
    result = posterior.main(argv)
    records = json.loads((out / "results.json").read_text())
    assert records == json.loads(json.dumps(result["records"]))
    for record in records:
        assert REQUIRED <= set(record)
        if record["dataset"] == "mnist":
            assert {"accuracy", "ece", "brier"} <= set(record)
        else:
            assert "rmse" in record and "ece" not in record
        assert math.isfinite(record["nll"])
    kinds = {(r["dataset"], r["method"], r["curvature"], r["prior_fit"]) for r in records}
    assert ("boston", "full", "ggn", "gridsearch") in kinds
    assert ("mnist", "kfoc_running", "mc", "marglik") in kinds
    assert ("mnist", "ekfoc", "mc", "gridsearch") in kinds
    assert ("mnist", "map", "none", "none") in kinds
    angles = {r["angle"] for r in records if "angle" in r}
    assert angles == set(ANGLES)
    assert all(r["dataset"] == "mnist" for r in records if "angle" in r)
    meta = json.loads((out / "meta.json").read_text())
    assert [s["method"] for s in meta["skipped"]] == ["full"]  # LeNet-5's full GGN
    assert max(meta["predictive_check"].values()) < 1e-4
    table = (out / "table.md").read_text()
    assert "skipped" in table and "## Against K-FAC (kron), paired per seed" in table
    assert "## Against K-FOC_running, paired per seed" in table
    assert "## Against full, paired per seed" in table
    paired = json.loads((out / "paired.json").read_text())
    assert {(p["method"], p["reference"]) for p in paired} >= {
        ("kfoc_running", "kron"),
        ("ekfoc", "kron"),
        ("ekfoc", "kfoc_running"),
        ("ekfoc", "full"),
    }
    assert {p["dataset"] for p in paired} == {"boston", "mnist", "mnist-rotated"}
    for name in ("datasets", "rotation", "paired"):
        assert (out / f"figure_posterior_{name}.png").stat().st_size > 10_000

    again = tmp_path / "replot"
    posterior.main(["--replot", str(out / "results.json"), "--out", str(again)])
    assert (again / "table.md").read_text() == table
    assert (again / "figure_posterior_rotation.png").exists()
    assert not (again / "results.json").exists()  # a replot writes the table and figures
