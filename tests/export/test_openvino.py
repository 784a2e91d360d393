"""Runs tests/export/openvino_cases.py (OpenVINO export, parity, INT8 gate, bad files) in its own process.

OpenVINO's runtime once crashed the one long pytest process: each `ov.Core` swaps the thread's alternate
signal stack, and Cores released out of order left a freed one installed, so a later signal handler died
with SIGSEGV (docs/RELIABILITY.md, "Runtimes in one process"). Our runners now share one Core, but
NNCF makes its own while quantizing, so the cases still run in a fresh interpreter, as detect.py, val.py
and export.py each are for a user. `python -m pytest tests/export/openvino_cases.py` runs them by hand.
"""
from __future__ import annotations

import pytest

from tests.backend_helpers import run_cases_in_own_process


@pytest.mark.slow
def test_openvino_cases_pass_in_their_own_process():
    run_cases_in_own_process("tests/export/openvino_cases.py")
