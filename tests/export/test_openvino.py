"""Runs tests/export/openvino_cases.py (OpenVINO export, parity, INT8 gate, bad files) in its own process.

OpenVINO's runtime, loaded into the one long pytest process, later crashed it (SIGSEGV in CPython's
take_gil, while a following LiteRT or Inductor test ran; never inside an OpenVINO call), so its cases run
in a fresh interpreter, as detect.py, val.py and export.py each are for a user. The cases file is a normal
pytest module: `python -m pytest tests/export/openvino_cases.py` runs it by hand.
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
