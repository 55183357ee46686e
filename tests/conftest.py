import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


def devices() -> list[str]:
    """CPU always; CUDA when available (the device-parametrised tests)."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=devices())
def device(request) -> torch.device:
    return torch.device(request.param)
