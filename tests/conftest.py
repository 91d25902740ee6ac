"""Test-suite fixtures: float64 by default, seeded generators, hypothesis profiles."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).parent))

# Two xdist workers share two cores: one torch thread each avoids thread contention
# (small ops otherwise stall waiting for the other thread).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

settings.register_profile(
    "default", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("ci", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("KVTHEORY_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _float64_default():
    """Theory runs in float64; restore the default afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded CPU generator, fresh for every test."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "wikitext-2-raw-v1" / "wiki.test.raw").exists():
        pytest.skip(f"corpora not found under {DATA_DIR}")
    return DATA_DIR
