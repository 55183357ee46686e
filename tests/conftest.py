import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kfoc_backpack.solver._common import accelerator_routes

sys.path.insert(0, str(Path(__file__).parent))


def devices() -> list[str]:
    """CPU, CPU on the accelerator routes, and CUDA when available.

    ``cpu-accelerator-routes`` runs on the CPU with the solver routes made for
    accelerators (few large operations, one host transfer per solve), so that these
    routes are tested on every machine, not only where a GPU is.
    """
    return ["cpu", "cpu-accelerator-routes"] + (["cuda"] if torch.cuda.is_available() else [])


def _device_note() -> str:
    """One line: where the ``device``-parametrised tests run, and whether CUDA is among."""
    if torch.cuda.is_available():
        return (
            f"device-parametrised tests run on: {', '.join(devices())} "
            f"(cuda = {torch.cuda.get_device_name()}, {torch.cuda.device_count()} device(s))"
        )
    return (
        "CUDA-parametrised tests were not generated: no CUDA device is available "
        f"(torch.cuda.is_available() is False); device-parametrised tests run on: "
        f"{', '.join(devices())}"
    )


_DEVICE_TESTS = pytest.StashKey[int]()


def pytest_report_header(config) -> str:
    return _device_note()


def pytest_collection_finish(session) -> None:
    session.config.stash[_DEVICE_TESTS] = sum(
        "device" in getattr(getattr(item, "callspec", None), "params", {}) for item in session.items
    )


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    # The header is hidden with -q: repeat the note at the end when it matters, i.e.
    # when device-parametrised tests were collected and CUDA is missing.
    if not torch.cuda.is_available() and config.stash.get(_DEVICE_TESTS, 0):
        terminalreporter.write_line(_device_note(), yellow=True)


@pytest.fixture
def keeps_threads() -> Iterator[None]:
    """Restore torch's intra-op thread count after the test.

    For tests that run an integration script's ``main``, which sets the count it
    measures with.
    """
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


@pytest.fixture(params=devices())
def device(request) -> Iterator[torch.device]:
    if request.param == "cpu-accelerator-routes":
        with accelerator_routes(True):
            yield torch.device("cpu")
    else:
        yield torch.device(request.param)


@pytest.fixture(params=["default-routes", "accelerator-routes"])
def routes(request) -> Iterator[str]:
    """Run a CPU test on the default routes and on the accelerator routes."""
    with accelerator_routes(request.param == "accelerator-routes"):
        yield request.param
