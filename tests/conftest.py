"""Suite-wide test settings."""
from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One intra-op thread for the whole suite: the test models are tiny, and on a small or shared machine
    OpenMP threads spin-waiting on each other make single forward passes many times slower.

    The scripts' `main()` apply the runtime policy (`utils.infer.runtime.apply_policy`: torch threads, glibc
    allocator); its off switch keeps the suite's process (and its subprocesses) as set here. The tests of the
    policy itself (tests/infer/test_runtime.py) switch it back on.
    """
    n, policy = torch.get_num_threads(), os.environ.get("MOBILEYOLO_RUNTIME_POLICY")
    torch.set_num_threads(1)
    os.environ["MOBILEYOLO_RUNTIME_POLICY"] = "0"
    yield
    torch.set_num_threads(n)
    if policy is None:
        os.environ.pop("MOBILEYOLO_RUNTIME_POLICY", None)
    else:
        os.environ["MOBILEYOLO_RUNTIME_POLICY"] = policy
