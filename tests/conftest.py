"""Test-wide settings: the repository root on sys.path, one torch thread, a fixed seed per test.

The test models are tiny: a second thread gains little, and on a busy machine the threads'
synchronisation makes small ops 10-40x slower (measured on the 2-core development container).
Seeding every test makes each one deterministic on its own, whatever runs before it.
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)
