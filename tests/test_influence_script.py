"""integration/influence.py: the LDS's parts against known answers, and a smoke run."""

from __future__ import annotations

import json

import influence
import pytest
import torch
from influence_study.ensembles import Recipe, measurement, train_ensemble
from influence_study.lds import lds, spearman
from influence_study.problems import TokenTransformer, patches
from torch import nn


def test_spearman_and_lds_of_known_datamodels():
    torch.manual_seed(0)
    masks = (torch.rand(30, 12) < 0.5).float()
    scores = torch.randn(4, 12)
    measured = -(masks @ scores.T)  # exactly the linear datamodel of the scores
    assert lds(scores, masks, measured) == pytest.approx(1.0)
    assert lds(-scores, masks, measured) == pytest.approx(-1.0)
    x = torch.arange(10.0).unsqueeze(1)
    assert float(spearman(x, x.exp())) == pytest.approx(1.0)  # ranks, not values


def test_ensemble_members_train_as_if_alone():
    """Model k of an ensemble is the model its seed and subset give trained on its own."""
    torch.manual_seed(1)
    X, y = torch.randn(24, 3), torch.randn(24, 1)
    recipe = Recipe(epochs=3, batch_size=4, lr=1e-2)

    def make():
        return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))

    masks = torch.ones(2, 24)
    pair = train_ensemble(make, X, y, "regression", recipe, masks, [5, 6], 0)
    alone = train_ensemble(make, X, y, "regression", recipe, masks[:1], [6], 0)
    assert torch.allclose(pair.model(1, make)(X), alone.model(0, make)(X), atol=1e-6)
    half = masks.clone()
    half[0, ::2] = 0
    split = train_ensemble(make, X, y, "regression", recipe, half, [5, 6], 0)
    assert not torch.allclose(split.model(0, make)(X), pair.model(0, make)(X))


def test_margin_and_tokens():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    margins = measurement("classification", logits, torch.tensor([0, 1]))
    expected = torch.tensor(
        [2.0 - torch.log(torch.tensor(2.0)), 1.0 - torch.log(torch.tensor(1 + torch.e))]
    )
    assert torch.allclose(margins, expected)
    images = torch.arange(2 * 28 * 28, dtype=torch.float32).reshape(2, 1, 28, 28)
    tokens = patches(images)
    assert tokens.shape == (2, 49, 16)
    assert torch.equal(tokens[0, 1], images[0, 0, :4, 4:8].flatten())
    assert TokenTransformer()(tokens).shape == (2, 10)


def test_quick_run_writes_every_output(tmp_path, keeps_threads):
    result = influence.main(
        [
            "--quick",
            "--problems",
            "boston",
            "--methods",
            "identity",
            "kfac",
            "ekfoc",
            "ggn",
            "--out",
            str(tmp_path),
        ]
    )
    saved = json.loads((tmp_path / "influence.json").read_text())
    assert saved["summary"] == result["summary"]
    methods = {(r["method"], r["damping"]) for r in saved["records"]}
    assert ("ekfoc", 0.1) in methods and ("ggn", 1.0) in methods
    assert all(-1 <= r["lds"] <= 1 for r in saved["records"])
    assert (tmp_path / "influence.md").read_text().startswith("LDS")
    assert (tmp_path / "figure_influence.png").exists()


@pytest.mark.parametrize(
    "argv",
    [["--dampings", "0.01", "1"], ["--quick", "--subsets", "5"], ["--subsets", "1"]],
)
def test_bad_arguments_exit_with_a_message(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        influence.parse_args(argv)
    assert exit_info.value.code == 2
    assert "error: argument" in capsys.readouterr().err
