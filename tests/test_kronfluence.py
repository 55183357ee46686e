"""The package's ``ekfac``/``kfac`` influence scores against kronfluence 1.0.1's own.

Runs where kronfluence installs (it needs torchvision: the zoo's environment, see the
README's library-model install plus ``pip install kronfluence==1.0.1``); skipped in the
CPU test environment, which has no torchvision.

Both sides: the empirical Fisher (kronfluence's ``use_empirical_fisher=True``; this
package's ``KFOCEFBackend``), the summed cross-entropy per input, kronfluence's damping
heuristic (``0.1 ×`` each block's mean eigenvalue), float64 throughout, and models
without biases: kronfluence folds a bias into its weight's Kronecker block (an input
entry of one), where this package gives a bias its own exact block.

Conventions differ in one place, shown by :func:`test_kfac_equals_kronfluence`:
kronfluence averages a convolution's output-side factor over the ``T`` output positions
(``Σ_{n,t} g gᵀ / (N·T)``), where K-FAC for convolutions (KFC, laplace-torch's ``kron``
and this package) sums the positions (``Σ_{n,t} g gᵀ / N``): its block is ``T`` times
smaller, so with relative damping its scores are ``T`` times larger on that layer.
EK-FAC is unaffected (the eigenbasis does not change with a factor's scale, and both
sides take the exact per-sample diagonal ``S``).
"""

from __future__ import annotations

import copy

import pytest
import torch
from laplace import Laplace
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kfoc_backpack import KFOCEFBackend
from kfoc_backpack.influence import Influence, Preconditioner

kronfluence = pytest.importorskip("kronfluence", reason="kronfluence (needs torchvision)")

DTYPE = torch.float64


class Classification(kronfluence.Task):
    """Summed cross-entropy at the true labels; the test measurement is the same loss."""

    def compute_train_loss(self, batch, model, sample=False):
        X, y = batch
        return nn.functional.cross_entropy(model(X), y, reduction="sum")

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)


def make(kind: str):
    torch.manual_seed(0)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(5, 7, bias=False), nn.Tanh(), nn.Linear(7, 3, bias=False))
        X = torch.randn(40, 5)
    else:
        model = nn.Sequential(
            nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(4, 3, 3, padding=1, bias=False),
            nn.Flatten(),
            nn.Linear(3 * 4 * 4, 3, bias=False),
        )
        X = torch.randn(40, 2, 8, 8)
    y = torch.randint(3, (40,))
    model = model.to(DTYPE)
    return model, TensorDataset(X[:30].to(DTYPE), y[:30]), TensorDataset(X[30:].to(DTYPE), y[30:])


def factor_arguments(strategy: str = "ekfac"):
    """kronfluence's factor arguments of these tests: the empirical Fisher, float64."""
    from kronfluence.arguments import FactorArguments

    return FactorArguments(
        strategy=strategy,
        use_empirical_fisher=True,
        activation_covariance_dtype=DTYPE,
        gradient_covariance_dtype=DTYPE,
        eigendecomposition_dtype=DTYPE,
        per_sample_gradient_dtype=DTYPE,
        lambda_dtype=DTYPE,
    )


def analyzer_of(model, name: str, tmp_path):
    """A kronfluence ``Analyzer`` on a tracked copy of ``model``."""
    from kronfluence.analyzer import Analyzer, prepare_model

    task = Classification()
    tracked = prepare_model(copy.deepcopy(model), task)
    return Analyzer(name, tracked, task, cpu=True, disable_tqdm=True, output_dir=str(tmp_path))


def pairwise(analyzer, factors_name: str, train, test):
    """kronfluence's pairwise scores with its heuristic damping, in float64."""
    from kronfluence.arguments import ScoreArguments

    score_args = ScoreArguments(
        damping_factor=None,
        per_sample_gradient_dtype=DTYPE,
        precondition_dtype=DTYPE,
        score_dtype=DTYPE,
    )
    analyzer.compute_pairwise_scores(
        "scores",
        factors_name,
        query_dataset=test,
        train_dataset=train,
        per_device_query_batch_size=5,
        per_device_train_batch_size=8,
        score_args=score_args,
        overwrite_output_dir=True,
    )
    return analyzer.load_pairwise_scores("scores")["all_modules"]


def kronfluence_scores(model, train, test, strategy, tmp_path):
    analyzer = analyzer_of(model, "parity", tmp_path)
    analyzer.fit_all_factors(
        "factors",
        train,
        per_device_batch_size=8,
        factor_args=factor_arguments(strategy),
        overwrite_output_dir=True,
    )
    return pairwise(analyzer, "factors", train, test)


def package_scores(model, train, test, structure, scales=None):
    la = Laplace(
        model,
        "classification",
        subset_of_weights="all",
        hessian_structure=structure,
        backend=KFOCEFBackend,
    )
    la.fit(DataLoader(train, batch_size=8))
    names = [name for name, _ in model.named_parameters()]
    blocks = dict(zip(names, la.H_facs.blocks))
    if scales:
        blocks = {name: b.scaled(scales.get(name, 1.0)) for name, b in blocks.items()}
    pre = Preconditioner.from_blocks(blocks, scale=1.0 / la.n_data)
    influence = Influence(model, nn.CrossEntropyLoss(reduction="sum"), pre)
    return influence.pairwise(DataLoader(train, batch_size=8), DataLoader(test, batch_size=5))


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_ekfac_equals_kronfluence(kind, tmp_path):
    model, train, test = make(kind)
    theirs = kronfluence_scores(model, train, test, "ekfac", tmp_path)
    ours = package_scores(model, train, test, "ekfac")
    assert rel(ours, theirs) < 1e-4


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_kfac_equals_kronfluence(kind, tmp_path):
    model, train, test = make(kind)
    theirs = kronfluence_scores(model, train, test, "kfac", tmp_path)
    positions = {}
    if kind == "cnn":  # kronfluence's output-side factor: the mean over T positions
        positions = {"0.weight": 1.0 / 16, "2.weight": 1.0 / 16}
        assert rel(package_scores(model, train, test, "kfac"), theirs) > 1e-2
    ours = package_scores(model, train, test, "kfac", positions)
    assert rel(ours, theirs) < 1e-4


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_kronfluence_pipeline_on_kfoc_factors_gives_ekfoc(kind, tmp_path):
    """kronfluence's eigendecomposition and correction of K-FOC's factors: this package's EK-FOC."""
    from kfoc_backpack.influence.kronfluence import use_kfoc_covariances

    model, train, test = make(kind)
    la = Laplace(
        model,
        "classification",
        subset_of_weights="all",
        hessian_structure="kfoc",
        backend=KFOCEFBackend,
    )
    la.fit(DataLoader(train, batch_size=8))
    names = [name for name, _ in model.named_parameters()]
    blocks = dict(zip(names, la.H_facs.blocks))

    analyzer = analyzer_of(model, "kfoc", tmp_path)
    args = factor_arguments("ekfac")
    analyzer.fit_covariance_matrices("kfoc", train, per_device_batch_size=8, factor_args=args)
    use_kfoc_covariances(analyzer, "kfoc", blocks)
    analyzer.perform_eigendecomposition("kfoc", factor_args=args)
    analyzer.fit_lambda_matrices("kfoc", train, per_device_batch_size=8, factor_args=args)
    theirs = pairwise(analyzer, "kfoc", train, test)
    ours = package_scores(model, train, test, "ekfoc")
    assert rel(ours, theirs) < 1e-4
    assert rel(package_scores(model, train, test, "ekfac"), theirs) > 1e-3  # another basis


def test_kronfluence_covariances_refuse_a_bias(tmp_path):
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments

    from kfoc_backpack.influence.kronfluence import use_kfoc_covariances

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3)).to(DTYPE)
    train = TensorDataset(torch.randn(12, 5, dtype=DTYPE), torch.randint(3, (12,)))
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kfoc")
    la.fit(DataLoader(train, batch_size=6))
    blocks = dict(zip(["0.weight", "0.bias"], la.H_facs.blocks))
    task = Classification()
    analyzer = Analyzer(
        "bias",
        prepare_model(copy.deepcopy(model), task),
        task,
        cpu=True,
        disable_tqdm=True,
        output_dir=str(tmp_path),
    )
    args = FactorArguments(activation_covariance_dtype=DTYPE, gradient_covariance_dtype=DTYPE)
    analyzer.fit_covariance_matrices("f", train, per_device_batch_size=6, factor_args=args)
    with pytest.raises(ValueError, match="folds the bias"):
        use_kfoc_covariances(analyzer, "f", blocks)


def test_speed_script_runs_every_method(tmp_path, keeps_threads):
    import influence_speed

    result = influence_speed.main(
        [
            "--train",
            "40",
            "--test",
            "8",
            "--batch",
            "16",
            "--repeats",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    assert [row["method"] for row in result["rows"]] == list(influence_speed.METHODS)
    assert all(row["total_s"] > 0 for row in result["rows"])
    assert (tmp_path / "influence_speed.json").exists()
