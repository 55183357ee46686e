"""Smoke test of integration/zoo.py (library models: ``kfoc`` against ``kron``).

The default suite runs the Hugging Face BERT of the zoo (``transformers`` is in the test
extra); the torchvision and timm models need the ``zoo`` extra, whose torchvision does not
load beside the CPU torch wheel CI installs.
"""

from __future__ import annotations

import json
import statistics
import sys

import pytest
import torch
import zoo

from kfoc_backpack.enums import Route


def test_bert_tiny_fits_both_methods(tmp_path):
    result = zoo.main(
        ["--models", "bert_tiny", "--repeats", "1", "--batch", "4", "--out", str(tmp_path)]
        + ["--sections", "curvature"]
    )
    (record,) = result["models"]
    assert record["errors"] == {}
    for method in zoo.METHODS:
        assert 0 < record[f"{method}_curvature_s"] <= record[f"{method}_fit_s"]
    # the freezing call named embeddings and LayerNorms by their full names, nothing else
    assert "hf_model.bert.embeddings.word_embeddings.weight" in record["frozen"]
    assert all("embeddings" in name or "LayerNorm" in name for name in record["frozen"])
    routes = {row["weight"]: row["route"] for row in record["layers"]}
    assert routes["hf_model.classifier.weight"] == "rank-one"  # the [CLS] token only
    encoder = "hf_model.bert.encoder.layer.0.intermediate.dense.weight"
    assert routes[encoder] in Route.values()
    assert all(row["steps"] >= 1 for row in record["layers"])
    saved = json.loads((tmp_path / "zoo.json").read_text())
    assert saved["models"][0]["model"] == "bert_tiny"
    assert "| bert_tiny |" in (tmp_path / "zoo.md").read_text()


@pytest.mark.parametrize("method", ["kron", "ekfoc"])
def test_whole_bert_tiny_fits_and_predicts(method):
    """Nothing frozen for ours (embeddings and LayerNorms included), kron's layers for kron."""
    record = zoo.whole_once("bert_tiny", method, batch=4, batches=2, inputs=3)
    assert record["finite"] and record["rows_sum_to_one"] and record["test_inputs"] == 3
    if method == "kron":
        assert "hf_model.bert.embeddings.word_embeddings.weight" in record["frozen"]
    else:
        assert record["frozen"] == []
        whole = sum(p.numel() for p in zoo.MODELS["bert_tiny"][0]().parameters())
        assert record["trainable"] == whole
    table = zoo.whole_table(
        [
            {
                "model": "bert_tiny",
                "errors": {"kron": "boom"},
                **{m: record for m in zoo.WHOLE_METHODS if m != "kron"},
            }
        ]
    )
    assert "| bert_tiny | kron | boom |" in table and "| bert_tiny | ekfoc |" in table


def test_whole_fit_ab_times_every_method_in_turns():
    """The whole table's fit ratio: each method's median over rounds after a warm-up."""
    found = zoo.whole_fit_ab("bert_tiny", batch=2, batches=1, repeats=2)
    assert set(found["fit_s"]) == set(zoo.AB_METHODS)
    assert found["rounds"] == 2
    for method, times in found["fit_s_all"].items():
        assert len(times) == 2 and found["fit_s"][method] == statistics.median(times)
    record = {"model": "bert_tiny", "errors": {"kron": "boom"}, "ab": found}
    record.update({m: {**_WHOLE_ROW, "fit_s": 9.0} for m in zoo.AB_METHODS})
    table = zoo.whole_table([record])
    ratio = found["fit_s"]["ekfoc"] / found["fit_s"]["kfoc"]
    assert f"| bert_tiny | ekfoc | 1 | 9.0 | {ratio:.2f}× |" in table
    assert table.splitlines()[-1].endswith("| yes | 2 |")  # the A/B rounds


def test_ab_rounds_add_what_the_budget_holds_within_the_cap():
    """More rounds for short fits, never fewer than asked, never more than the cap."""
    assert zoo.ab_rounds(2, round_seconds=5.0, budget_seconds=0.0) == 2
    assert zoo.ab_rounds(2, round_seconds=5.0, budget_seconds=60.0) == 12
    assert zoo.ab_rounds(2, round_seconds=100.0, budget_seconds=60.0) == 2
    assert zoo.ab_rounds(2, round_seconds=0.5, budget_seconds=60.0) == zoo.MAX_AB_ROUNDS
    assert zoo.ab_rounds(20, round_seconds=0.5, budget_seconds=60.0) == 20


_WHOLE_ROW = {
    "trainable": 1,
    "peak_after_fit_mb": 1.0,
    "predict_s_per_input": 0.1,
    "predict_added_peak_mb": 0.0,
    "test_inputs": 3,
    "log_marginal_likelihood": -1.0,
    "rows_sum_to_one": True,
}


def test_missing_library_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(ImportError, match=r"\.\[zoo\]"):
        zoo.make("vit_tiny", batch=2, batches=1)


@pytest.mark.parametrize("structure", ["kron", "kfoc", "ekfoc"])
def test_the_decomposition_timer_sees_every_structure(structure):
    """The curvature time excludes each structure's eigendecomposition, this package's too."""
    from laplace import Laplace
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    data = TensorDataset(torch.randn(12, 4), torch.randint(3, (12,)))
    la = Laplace(model, "classification", "all", structure)
    with zoo.decompose_timer() as spent:
        la.fit(DataLoader(data, batch_size=6))
    assert len(spent) == 1 and spent[0] > 0
    assert "decompose" not in type(la.H_facs).__dict__ or all(
        getattr(cls.decompose, "__name__", "") != "timed" for cls in zoo._kron_classes()
    )
