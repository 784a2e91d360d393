"""Device strings as YOLOv5 users write them (`--device cpu`, `0,1`, `cuda:1`)."""
from __future__ import annotations

import pytest
import torch

from utils.core.devices import device_memory_str, parse_device, select_device
from utils.core.errors import FlagError


def test_parse_and_select_device():
    assert parse_device("cpu") == ("cpu", [])
    assert parse_device("0,1") == ("cuda", [0, 1])
    assert parse_device("cuda:1") == ("cuda", [1])
    assert parse_device("") == ("auto", [])
    assert select_device("cpu") == torch.device("cpu")
    for bad in ("gpu", "0,,x", "1,1", "-1"):
        with pytest.raises(FlagError, match="--device"):
            parse_device(bad)
    if not torch.cuda.is_available():
        assert select_device("") == torch.device("cpu")
        with pytest.raises(ValueError, match="CUDA is not available"):
            select_device("0")
    assert device_memory_str(torch.device("cpu")) == "-"
