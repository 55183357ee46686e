"""integration/paper.py: error computation against a dense reference, estimators, a tiny run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import paper
import pytest
import torch
from data import Dataset
from torch import nn

from kfoc_backpack.solver import KroneckerAccumulator, SolverOptions, nearest_kronecker_terms

pytest.importorskip("matplotlib")
pytest.importorskip("mlxtend")

REPO = Path(__file__).resolve().parents[1]


def _regression_data(n=12, d=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return Dataset(
        "toy", torch.randn(n, d, generator=gen), torch.randn(n, 1, generator=gen), "regression"
    )


def _conv_data(n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return Dataset(
        "toyconv",
        torch.randn(n, 1, 6, 6, generator=gen),
        torch.randint(0, 3, (n,), generator=gen),
        "classification",
    )


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))


def _convnet(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 3), nn.Flatten(),
        nn.Linear(2 * 4 * 4, 3),
    )  # fmt: skip


def _dense_ggn(model, data, index):
    """Independent reference: Σ_n J_nᵀ H_n J_n of a weight, by autograd (sum reduction)."""
    weight = model[index].weight
    blocks = 0
    for x in data.inputs:
        out = model(x.unsqueeze(0))[0]
        jac = torch.stack(
            [torch.autograd.grad(o, weight, retain_graph=True)[0].flatten() for o in out]
        ).double()
        if data.task == "regression":
            hess = 2 * torch.eye(out.shape[0], dtype=torch.float64)  # MSELoss(sum)
        else:
            p = out.detach().double().softmax(0)
            hess = torch.diag(p) - torch.outer(p, p)
        blocks = blocks + jac.T @ hess @ jac
    return blocks


@pytest.mark.parametrize("case", ["mlp", "conv"])
def test_ground_truth_matches_dense_autograd_reference(case):
    data = _regression_data() if case == "mlp" else _conv_data()
    model = _mlp() if case == "mlp" else _convnet()
    layers = {"a": 0, "b": 2}
    reference = {name: _dense_ggn(model, data, idx) for name, idx in layers.items()}
    collected = paper.collect_layers(model, data, layers, seed=0, chunk=5, device="cpu", exact=True)
    gen = torch.Generator().manual_seed(1)
    for name, layer in collected.items():
        dense_ref = reference[name]
        truth = paper.GroundTruth(layer.terms)
        structured = paper.GroundTruth(layer.terms, dense_max_side=0)
        assert truth.dense is not None and structured.dense is None
        torch.testing.assert_close(truth.dense, dense_ref, rtol=1e-5, atol=1e-8)
        m, n = layer.terms.shape
        a, b = torch.randn(m, m, generator=gen), torch.randn(n, n, generator=gen)
        candidates = [
            (a @ a.T, b @ b.T),
            layer.kfac,
            tuple(f.double() for f in layer.terms.solve()[:2]),
        ]
        for left, right in candidates:
            left, right = left.double(), right.double()
            expected = torch.linalg.norm(dense_ref - torch.kron(left, right)) / torch.linalg.norm(
                dense_ref
            )
            assert truth.error(left, right) == pytest.approx(float(expected), rel=1e-5, abs=1e-6)
            assert structured.error(left, right) == pytest.approx(
                float(expected), rel=1e-5, abs=1e-5
            )
        off_diag = dense_ref - torch.diag(torch.diagonal(dense_ref))
        expected_diag = torch.linalg.norm(off_diag) / torch.linalg.norm(dense_ref)
        assert truth.diagonal_error() == pytest.approx(float(expected_diag), rel=1e-6)
        assert structured.diagonal_error() == pytest.approx(float(expected_diag), rel=1e-5)


def test_input_norms_match_kfac_scale():
    data = _conv_data(n=4)
    collected = paper.collect_layers(_convnet(), data, {"c1": 0, "c2": 2, "fc": 4}, 0, 2, "cpu")
    positions = {"c1": 36, "c2": 16, "fc": 1}  # output positions T of each layer
    for name, layer in collected.items():
        # KFC's input factor is (1/(N·T)) Σ â âᵀ: its trace is the mean input norm² / T
        assert float(torch.trace(layer.kfac[1])) * positions[name] == pytest.approx(
            float(layer.input_sq.mean()), rel=1e-6
        )


def test_chunked_pass_equals_single_pass():
    data = _regression_data(n=10)
    one = paper.collect_layers(_mlp(), data, {"l1": 0}, seed=3, chunk=10, device="cpu")["l1"]
    two = paper.collect_layers(_mlp(), data, {"l1": 0}, seed=3, chunk=4, device="cpu")["l1"]
    torch.testing.assert_close(one.terms.inputs, two.terms.inputs)
    torch.testing.assert_close(one.kfac[1], two.kfac[1])
    # the sampled labels differ between the chunkings, the inputs and K-FAC's R do not


def _errors(data, model, layers, sizes, seed=0):
    collected = paper.collect_layers(model, data, layers, seed, 1000, "cpu")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return collected, {
        name: paper.layer_errors(layer, order, sizes, SolverOptions()).errors
        for name, layer in collected.items()
    }


def test_estimators_ordering_and_special_cases():
    data = _regression_data(n=24, d=3)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))  # no all-zero blocks
    sizes = [1, 5, 24]
    collected, errors = _errors(data, model, {"layer1": 0, "layer2": 2}, sizes)
    for name, errs in errors.items():
        for size in sizes:
            opt = errs[(size, "kfoc_optimal")]
            for method in ("kfoc_running", "kfoc_approx", "kfoc_approx_paper", "kfac", "diag"):
                assert opt <= errs[(size, method)] + 1e-9, (name, size, method)
        full = errs[(24, "kfoc_optimal")]
        for method in ("kfoc_running", "kfoc_approx", "kfoc_approx_paper"):
            assert errs[(24, method)] == pytest.approx(full, abs=1e-6)  # one batch: optimal
        # Linear at batch size one: approx in K-FAC's split is K-FAC itself
        assert errs[(1, "kfoc_approx")] == pytest.approx(errs[(1, "kfac")], rel=1e-6)
    # one output unit: every batch block is exactly Kronecker, running and optimal exact
    for size in sizes:
        assert errors["layer2"][(size, "kfoc_running")] < 1e-6
        assert errors["layer2"][(size, "kfoc_optimal")] < 1e-6


def test_kfac_is_batch_size_invariant_for_linear():
    data = _regression_data(n=13)
    layer = paper.collect_layers(_mlp(), data, {"l": 0}, 0, 100, "cpu")["l"]
    acc = KroneckerAccumulator("approx")
    for start in range(0, 13, 5):
        part = paper.slice_terms(layer.terms, slice(start, start + 5))
        sqrt = part.sqrt_out.flatten(end_dim=1)
        count = part.inputs.shape[0]
        left = sqrt.T @ sqrt
        right = part.inputs.T @ part.inputs / count
        acc.update(left / count, right, weight=count)
    left, right = acc.factors()
    torch.testing.assert_close(left, layer.kfac[0])
    torch.testing.assert_close(right, layer.kfac[1])


def test_optimal_over_batch_blocks_equals_full_block():
    data = _conv_data(n=8)
    layer = paper.collect_layers(_convnet(), data, {"c": 2}, 0, 100, "cpu")["c"]
    blocks = [paper.slice_terms(layer.terms, slice(s, s + 3)) for s in range(0, 8, 3)]
    options = SolverOptions(tol=1e-12, max_iter=5000)
    per_block = nearest_kronecker_terms(blocks, options=options)
    full = nearest_kronecker_terms([layer.terms], options=options)
    truth = paper.GroundTruth(layer.terms)
    assert truth.error(per_block.left, per_block.right) == pytest.approx(
        truth.error(full.left, full.right), abs=1e-8
    )
    torch.testing.assert_close(
        torch.kron(per_block.left, per_block.right), torch.kron(full.left, full.right)
    )


def test_batch_sizes():
    assert paper.batch_sizes("boston", 506) == [1, 10, 100, 506]
    assert paper.batch_sizes("mnist", 5000) == [1, 10, 100, 1000]
    assert paper.batch_sizes("mnist", 300) == [1, 10, 100, 300]
    assert paper.batch_sizes("energy", 50) == [1, 10, 50]


def test_check_acceptance_flags_violations():
    def rec(layer, method, value, size=10):
        return {
            "dataset": "d", "layer": layer, "batch_size": size, "method": method,
            "error_mean": value, "error_min": value, "error_max": value, "seeds": 1,
        }  # fmt: skip

    good = [rec("layer2", "kfoc_optimal", 0.0), rec("layer2", "kfoc_running", 1e-9),
            rec("layer2", "kfac", 0.1)]  # fmt: skip
    assert not any(line.startswith("FAIL") for line in paper.check_acceptance(good))
    bad = [rec("layer1", "kfoc_optimal", 0.3), rec("layer1", "kfoc_running", 0.5),
           rec("layer1", "kfac", 0.4)]  # fmt: skip
    assert any(line.startswith("FAIL") for line in paper.check_acceptance(bad))


def _check_outputs(out: Path, datasets: list[str], seeds: int, timed: bool = True):
    results = json.loads((out / "results.json").read_text())
    runtime = json.loads((out / "runtime.json").read_text())
    keys = {"dataset", "layer", "batch_size", "method", "error_mean", "error_min",
            "error_max", "seeds"}  # fmt: skip
    assert results and all(keys <= set(r) for r in results)
    assert {r["dataset"] for r in results} == set(datasets)
    assert {r["method"] for r in results} >= set(paper.METHODS)
    assert all(r["seeds"] == seeds for r in results)
    assert all(0 <= r["error_min"] <= r["error_mean"] + 1e-12 for r in results)
    assert all(r["error_mean"] <= r["error_max"] + 1e-12 for r in results)
    if not timed:
        assert runtime == []
    else:
        assert runtime and all(
            {"dataset", "batch_size", "method", "median_ms"} <= set(r) for r in runtime
        )
        assert {r["method"] for r in runtime} == set(paper.RUNTIME_METHODS)
    for name in datasets:
        assert (out / f"figure_{name}.png").stat().st_size > 1000
    assert "K-FOC_running" in (out / "table.md").read_text()


def test_tiny_end_to_end_run(tmp_path, capsys):
    argv = ["--datasets", "boston", "mnist", "--seeds", "2", "--subset", "24",
            "--epochs", "1", "--runtime-repeats", "1", "--out", str(tmp_path)]  # fmt: skip
    outcome = paper.main(argv)
    _check_outputs(tmp_path, ["boston", "mnist"], seeds=2)
    printed = capsys.readouterr().out
    assert "| layer | method |" in printed and "## Checks" in printed
    layers = {(r["dataset"], r["layer"]) for r in outcome["results"]}
    assert layers == {("boston", "layer1"), ("boston", "layer2"), ("mnist", "conv1"),
                      ("mnist", "conv2")}  # fmt: skip
    sizes = {r["batch_size"] for r in outcome["results"] if r["dataset"] == "mnist"}
    assert sizes == {1, 10, 24}
    meta = json.loads((tmp_path / "meta.json").read_text())["datasets"]
    assert meta["boston"]["layers"] == {"layer1": "Linear 13→50", "layer2": "Linear 50→1"}
    assert meta["mnist"]["layers"] == {"conv1": "Conv2d 1→6, 5×5", "conv2": "Conv2d 6→16, 5×5"}
    assert meta["mnist"]["samples"] == 24


def test_script_entry_point_runs_from_repo_root(tmp_path):
    argv = [sys.executable, "integration/paper.py", "--datasets", "boston", "--seeds", "1",
            "--subset", "12", "--epochs", "1", "--runtime-repeats", "0", "--with-bias",
            "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _check_outputs(tmp_path, ["boston"], seeds=1, timed=False)
    assert "Full backward hook" not in proc.stderr
    layers = json.loads((tmp_path / "meta.json").read_text())["datasets"]["boston"]["layers"]
    assert layers == {"layer1": "Linear 13→50 + bias", "layer2": "Linear 50→1 + bias"}


def test_plots_redraw_figures_from_reference_results(tmp_path, capsys):
    import plots

    reference = REPO / "integration" / "reference" / "paper_results.json"
    paths = plots.main([str(reference), "--datasets", "boston", "mnist", "--out", str(tmp_path)])
    assert [p.name for p in paths] == ["figure_boston.png", "figure_mnist.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
    assert capsys.readouterr().out.split() == [str(p) for p in paths]
    records = json.loads(reference.read_text())
    # no meta.json beside the reference: full data sets (MNIST's largest batch is 1000)
    assert plots.samples_and_layers(records, "boston", None) == (506, None)
    assert plots.samples_and_layers(records, "mnist", None) == (5000, None)
    small = [dict(r, batch_size=min(r["batch_size"], 24)) for r in records]
    assert plots.samples_and_layers(small, "mnist", None)[0] == 24  # a subset run
    meta = {"datasets": {"boston": {"samples": 300, "layers": {"layer1": "L"}}}}
    assert plots.samples_and_layers(records, "boston", meta) == (300, {"layer1": "L"})


def test_plot_texts():
    import plots

    assert plots.layer_title("layer1", "Linear 13→50") == "layer 1: Linear 13→50"
    assert plots.layer_title("conv2", "Conv2d 6→16, 5×5") == "conv2: Conv2d 6→16, 5×5"
    assert plots.layer_title("head", None) == "head"
    assert "the 10 seeds 0–9" in plots.caption([10] * 4)
    assert "minimum to maximum" in plots.caption([3])
    assert "full batch" in plots.caption([3], full_batch=True)
    assert "full batch" not in plots.caption([3])
    assert plots._paper_layers("boston") == {"layer1": "Linear 13→50", "layer2": "Linear 50→1"}
    assert plots._paper_layers("toy") == {}


def test_with_bias_block_is_weight_and_bias():
    data = _regression_data(n=9)
    model = _mlp()
    layer = paper.collect_layers(model, data, {"l": 0}, 0, 100, "cpu", exact=True,
                                 with_bias=True)["l"]  # fmt: skip
    # reference: GGN block of the parameters [W, b] in the paper's Ŵ layout (bias last column)
    weight, bias = model[0].weight, model[0].bias
    dense = 0
    for x in data.inputs:
        out = model(x.unsqueeze(0))[0, 0]
        grad_w, grad_b = torch.autograd.grad(out, (weight, bias))
        row = torch.cat([grad_w, grad_b.unsqueeze(1)], 1).flatten().double()
        dense = dense + 2 * torch.outer(row, row)
    torch.testing.assert_close(layer.terms.dense(), dense)
    with pytest.raises(NotImplementedError):
        paper.collect_layers(_convnet(), _conv_data(), {"c": 0}, 0, 10, "cpu", with_bias=True)


@pytest.mark.slow
def test_quick_run_all_datasets(tmp_path):
    outcome = paper.main(["--quick", "--out", str(tmp_path)])
    _check_outputs(tmp_path, list(paper.DATASETS), seeds=3)
    assert not any(c.startswith("FAIL") for c in outcome["checks"])
