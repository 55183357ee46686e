"""The import-time version gate."""

import pytest
from packaging.version import Version

from kfoc_backpack import _compat


def fake_versions(monkeypatch, **versions):
    def installed(package):
        value = versions.get(package.replace("-", "_"))
        return None if value is None else Version(value)

    monkeypatch.setattr(_compat, "installed_version", installed)
    monkeypatch.delenv(_compat.SKIP_ENV, raising=False)


SUPPORTED = dict(
    torch="2.15.0",
    backpack_for_pytorch="1.7.1",
    laplace_torch="0.3",
    curvlinops_for_pytorch="3.0.1",
)


def test_installed_versions_pass():
    _compat.check_versions()


@pytest.mark.parametrize("torch", ["2.13.0", "2.14.1", "2.15.0"])
def test_every_tested_torch_passes(monkeypatch, torch):
    fake_versions(monkeypatch, **{**SUPPORTED, "torch": torch})
    _compat.check_versions()


@pytest.mark.parametrize(
    "reported,expected",
    [("2.13.0+cpu", "2.13.0"), ("2.15.0+cu132", "2.15.0"), ("2.16.0.dev20260101", "2.16.0")],
)
def test_installed_version_drops_local_labels(monkeypatch, reported, expected):
    monkeypatch.setattr(_compat, "version", lambda package: reported)
    assert _compat.installed_version("torch") == Version(expected)


def test_supported_combination_passes(monkeypatch):
    fake_versions(monkeypatch, **SUPPORTED)
    _compat.check_versions()
    fake_versions(
        monkeypatch, **{**SUPPORTED, "laplace_torch": "0.2.2.2", "curvlinops_for_pytorch": "2.0.1"}
    )
    _compat.check_versions()


@pytest.mark.parametrize(
    "override,match",
    [
        ({"backpack_for_pytorch": "1.5.2"}, "backpack-for-pytorch 1.5.2"),
        ({"backpack_for_pytorch": "1.8.0"}, "supported: >=1.6,<1.8"),
        ({"laplace_torch": "0.2.2.1"}, "laplace-torch 0.2.2.1"),
        ({"laplace_torch": "0.4"}, "laplace-torch 0.4"),
        ({"torch": "2.12.0"}, "torch 2.12.0"),
        ({"torch": "2.16.0"}, r"torch 2\.16\.0 \(supported: >=2\.13,<2\.16\)"),
        ({"laplace_torch": None}, "laplace-torch not installed"),
        ({"laplace_torch": "0.2.2.2"}, "needs curvlinops-for-pytorch<3"),
        ({"curvlinops_for_pytorch": "2.0.1"}, "needs curvlinops-for-pytorch>=3.0.1"),
    ],
)
def test_unsupported_versions_raise_clearly(monkeypatch, override, match):
    fake_versions(monkeypatch, **{**SUPPORTED, **override})
    with pytest.raises(ImportError, match=match) as info:
        _compat.check_versions()
    assert _compat.SKIP_ENV in str(info.value)


def test_skip_switch(monkeypatch):
    fake_versions(monkeypatch, **{**SUPPORTED, "torch": "1.0"})
    monkeypatch.setenv(_compat.SKIP_ENV, "1")
    _compat.check_versions()
