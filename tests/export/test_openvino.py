"""Runs tests/export/openvino_cases.py (OpenVINO export, parity, INT8 gate, bad files) in its own process.

OpenVINO's runtime once crashed the one long pytest process: each `ov.Core` swaps the thread's alternate
signal stack, and Cores released out of order left a freed one installed, so a later signal handler died
with SIGSEGV (docs/RELIABILITY.md, "Runtimes in one process"). Our runners now share one Core, but
NNCF makes its own while quantizing, so the cases still run in a fresh interpreter, as detect.py, val.py
and export.py each are for a user. `python -m pytest tests/export/openvino_cases.py` runs them by hand.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from utils.core.paths import ROOT


@pytest.mark.slow
def test_openvino_cases_pass_in_their_own_process():
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/export/openvino_cases.py"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=dict(os.environ))
    tail = (res.stdout + res.stderr)[-3000:]
    assert res.returncode == 0, tail
    assert " passed" in res.stdout and " failed" not in res.stdout and "skipped" not in res.stdout, tail
