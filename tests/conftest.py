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
