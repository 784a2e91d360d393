"""Suite-wide test settings."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One intra-op thread for the whole suite: the test models are tiny, and on a small or shared machine
    OpenMP threads spin-waiting on each other made single forward passes ~10x slower (README, Benchmarks)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
