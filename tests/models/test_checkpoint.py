"""models/checkpoint.py: atomic writes, weights_only loading, clear errors for bad files."""
from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import (
    CheckpointError,
    foreign_format,
    load_checkpoint,
    save_checkpoint,
)


def _ckpt() -> dict:
    return {"model": {"w": torch.arange(6.0).view(2, 3)}, "ema": None, "yaml": {"nc": 2, "anchors": 3},
            "names": ["a", "b"], "anchors": torch.ones(3, 3, 2), "stride": torch.tensor([8.0, 16.0, 32.0]),
            "hyp": {"lr0": 0.01}, "args": {"data": Path("x.yaml"), "imgsz": np.int64(64)}, "epoch": 3,
            "optimizer": None, "best_fitness": 0.5, "updates": 7, "shape": (1, 2)}


def test_round_trip_plain_data(tmp_path):
    p = save_checkpoint(_ckpt(), tmp_path / "w" / "last.pt")
    ck = load_checkpoint(p)
    assert torch.equal(ck["model"]["w"], torch.arange(6.0).view(2, 3))
    assert ck["args"] == {"data": "x.yaml", "imgsz": 64}  # Path and numpy scalar made plain
    assert ck["shape"] == [1, 2] and ck["version"] == 1 and isinstance(ck["date"], str)
    assert not list(p.parent.glob("*.tmp"))  # no temp file left behind


def test_atomic_replace_keeps_old_file_on_failure(tmp_path, monkeypatch):
    p = save_checkpoint(_ckpt(), tmp_path / "last.pt")
    before = p.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({**_ckpt(), "epoch": 4}, p)
    assert p.read_bytes() == before
    assert not list(tmp_path.glob("*.tmp"))
    assert load_checkpoint(p)["epoch"] == 3


def test_truncated_empty_missing_and_foreign_files(tmp_path):
    p = save_checkpoint(_ckpt(), tmp_path / "good.pt")
    data = p.read_bytes()
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="trunc.pt.*(unreadable or truncated)"):
        load_checkpoint(trunc)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(empty)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    text = tmp_path / "text.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="text.pt"):
        load_checkpoint(text)
    sd = tmp_path / "state_dict.pt"
    torch.save({"features.0.weight": torch.zeros(1)}, sd)  # e.g. a torchvision state_dict
    with pytest.raises(CheckpointError, match="missing keys: model, yaml, names"):
        load_checkpoint(sd)
    lst = tmp_path / "list.pt"
    torch.save([1, 2], lst)
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_checkpoint(lst)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickled_code_is_refused(tmp_path):
    bad = tmp_path / "evil.pt"
    torch.save({"model": _Evil(), "yaml": {}, "names": []}, bad)
    with pytest.raises(CheckpointError, match=r"refused unsafe content: global '(posix|nt)\.system' is not allowed\)"):
        load_checkpoint(bad)
    assert foreign_format(bad) is None


def test_truncated_reason_is_one_sentence(tmp_path):
    p = save_checkpoint(_ckpt(), tmp_path / "good.pt")
    cut = tmp_path / "cut.pt"
    cut.write_bytes(p.read_bytes()[:100])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(cut)
    assert str(e.value).startswith(f"{cut}: not a valid MobileYOLO checkpoint (unreadable or truncated: ")
    assert "\n" not in str(e.value) and "internal" not in str(e.value)


def test_ultralytics_checkpoint_gets_its_own_message(tmp_path, monkeypatch):
    """A pickle of Ultralytics' classes (YOLOv8 and later) is named as such; nothing in it is loaded."""
    cls = type("DetectionModel", (), {})
    cls.__module__ = "ultralytics"
    fake = types.ModuleType("ultralytics")
    fake.DetectionModel = cls
    monkeypatch.setitem(sys.modules, "ultralytics", fake)
    f = tmp_path / "yolov8n.pt"
    torch.save({"model": cls(), "train_args": {}}, f)
    monkeypatch.delitem(sys.modules, "ultralytics")
    assert foreign_format(f) == "ultralytics"
    with pytest.raises(CheckpointError, match=r"yolov8n\.pt: an Ultralytics \(YOLOv8 or later\) checkpoint"):
        load_checkpoint(f)


def test_model_from_checkpoint_and_wrong_model(tmp_path):
    from models.checkpoint import model_from_checkpoint
    from models.yolo import Model
    from tests.train_helpers import tiny_yaml

    m = Model(tiny_yaml())
    ck = {"model": m.state_dict(), "ema": None, "yaml": m.yaml, "names": ["x", "y"], "stride": m.stride}
    p = save_checkpoint(ck, tmp_path / "ok.pt")
    back = model_from_checkpoint(p)
    assert back.names == ["x", "y"] and not back.training
    x = torch.rand(1, 3, 64, 64)
    m.eval()
    assert all(torch.equal(a, b) for a, b in zip(m(x), back(x)))
    other = tiny_yaml(nc=5)  # same layout, other class count: the head's shapes differ
    bad = save_checkpoint({**ck, "yaml": other}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="other.pt.*do not fit"):
        model_from_checkpoint(bad)
