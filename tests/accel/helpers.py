"""Shared by the tests of utils/accel."""
from __future__ import annotations

import shutil

import pytest

from utils.accel import native

HAVE_CC = native.compiler() is not None and shutil.which(native.compiler()) is not None
needs_cc = pytest.mark.skipif(not HAVE_CC, reason="no C compiler: the kernels are off and PyTorch's run")
