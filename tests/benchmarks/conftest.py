"""Fixtures of the benchmark tests."""
from __future__ import annotations

import pytest
import yaml

from tests.backend_helpers import TINY


@pytest.fixture()
def tiny_yaml(tmp_path):
    """The tiny two-level detector (tests/backend_helpers.TINY) as `tiny-yolo.yaml`."""
    f = tmp_path / "tiny-yolo.yaml"
    f.write_text(yaml.safe_dump(TINY))
    return f
