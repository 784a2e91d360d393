"""Runs tests/export/tflite_cases.py (TFLite export, parity, INT8 gate, bad files) in its own process.

litert-torch imports JAX, whose threads stay alive; a later test that forks (DataLoader workers) then
forks a multithreaded process, which JAX warns can deadlock. In a fresh interpreter JAX never enters the
main pytest process. `python -m pytest tests/export/tflite_cases.py` runs the cases by hand.
"""
from __future__ import annotations

import pytest

from tests.backend_helpers import run_cases_in_own_process


@pytest.mark.slow
def test_tflite_cases_pass_in_their_own_process():
    run_cases_in_own_process("tests/export/tflite_cases.py")
