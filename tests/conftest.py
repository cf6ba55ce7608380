"""Test-wide settings: the repository root on sys.path, and one torch thread.

The test models are tiny: a second thread gains little, and on a busy machine the threads'
synchronisation makes small ops 10-40x slower (measured on the 2-core development container).
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(1)
