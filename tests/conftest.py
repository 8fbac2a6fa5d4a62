import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)  # tiny models: one thread is fastest, and immune to a busy machine

# Real public data (../shared/data beside the checkout, or $NUTEPRUNE_DATA); tests that need it skip without it.
DATA = Path(os.environ.get("NUTEPRUNE_DATA", ROOT.parent / "shared" / "data"))


def need(*parts) -> Path:
    p = DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} not available")
    return p


@pytest.fixture
def data_dir():
    return DATA
