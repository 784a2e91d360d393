"""benchmarks/memory.py: each mode small (figures printed, never asserted against a threshold)."""
from __future__ import annotations

import re

import pytest
import torch

from benchmarks import memory
from tests.train_helpers import FAST_HYP
from utils.data.synthetic import make_synthetic_dataset


def test_rss_is_read_from_proc():
    assert memory.rss_mb() > 10
    assert memory.rss_mb(pid=2**22 + 12345) != memory.rss_mb(pid=2**22 + 12345)  # NaN: no such process
    assert memory.children_pss_mb() >= 0.0
    assert memory.marks(10_000, 100) == [100, *range(1000, 10_001, 1000)]
    assert memory.marks(5, 10) == [1, 2, 3, 4, 5]


def test_detect_mode_prints_rss_at_frames(tiny_yaml, capsys):
    threads = torch.get_num_threads()
    res = memory.main(["detect", "--frames", "20", "--cfg", str(tiny_yaml), "--imgsz", "64"])
    assert torch.get_num_threads() == threads  # --threads applies to detect/val only
    assert [n for n, _, _ in res["detect"]] == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    assert all(rss > 10 for _, rss, _ in res["detect"])
    out = capsys.readouterr().out
    assert re.search(r"detect: frame +20: RSS +\d+\.\d MiB", out)
    assert re.search(r"20 frames, [1-9]\d* detections", out)  # the random model's boxes reach NMS and drawing
    assert re.search(r"detect: RSS \d+\.\d MiB at frame 2 -> \d+\.\d MiB at frame 20 \([+-]\d+\.\d MiB\)", out)
    with pytest.raises(SystemExit):
        memory.parse_opt(["leak"])


def test_val_mode_samples_during_and_after_evaluate(tiny_yaml, capsys):
    res = memory.val_memory(images=24, imgsz=64, batch_size=4, workers=0, cfg=str(tiny_yaml), img_px=64)
    assert [n for n, _, _ in res] == [4, 8, 12, 16, 20, 24, 25]  # warm-up 16 is among the tenths here
    out = capsys.readouterr().out
    assert re.search(r"val: image +24: RSS +\d+\.\d MiB, workers' PSS +0\.0 MiB", out)
    assert "val: after the metrics: RSS" in out and "mAP50" in out


@pytest.mark.slow
def test_train_mode_samples_every_epoch(tiny_yaml, tmp_path, capsys):
    data = make_synthetic_dataset(tmp_path / "ds", n_train=4, n_val=2, imgsz=64)
    res = memory.train_memory(data=str(data), cfg=str(tiny_yaml), imgsz=64, batch_size=4, epochs=2, workers=0,
                              noplots=True, noautoanchor=True, hyp_overrides=FAST_HYP, workdir=tmp_path, trim=True)
    assert [n for n, _, _ in res] == [1, 2] and all(rss > 10 for _, rss, _ in res)
    out = capsys.readouterr().out
    assert re.search(r"train: epoch +2: RSS +\d+\.\d MiB, workers' PSS +\d+\.\d MiB, after malloc_trim +\d+\.\d MiB", out)
    assert memory.summary("train", res, "epoch").startswith("train: RSS ")
    assert not list(tmp_path.glob("tmp*"))  # the run folder was temporary
