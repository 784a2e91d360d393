"""Shared bits of the backend/detect/export tests: tiny checkpoints, generated videos and images."""
from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import torch

# Two levels (strides 8 and 16), ~40 k parameters: fast enough for 500-frame loops on a shared CPU.
TINY = {
    "nc": 2, "depth_multiple": 1.0, "width_multiple": 1.0,
    "anchors": [[8, 8, 14, 14, 20, 20], [24, 24, 34, 34, 48, 48]],
    "backbone": [
        [-1, 1, "Conv", [8, 3, 2]],  # 0 /2
        [-1, 1, "Conv", [16, 3, 2]],  # 1 /4
        [-1, 1, "Conv", [24, 3, 2]],  # 2 /8 P3
        [-1, 1, "C3", [24]],  # 3
        [-1, 1, "Conv", [32, 3, 2]],  # 4 /16 P4
    ],
    "head": [[[3, 4], 1, "Detect", ["nc", "anchors"]]],
}


def make_checkpoint(path: Path, cfg: str | Path | dict | None = None, nc: int = 2, imgsz: int = 64,
                    names: list[str] | None = None, obj_logit: float | None = None, seed: int = 0) -> Path:
    """Build `Model(cfg, nc)` with random weights and save it as a MobileYOLO checkpoint at `path`.

    `obj_logit` overrides the objectness bias of every anchor, so an untrained model produces
    confident boxes (handy for tests that need detections).
    """
    from models.yolo import Model
    from models.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    m = Model(cfg if cfg is not None else TINY, nc=nc)
    if obj_logit is not None:
        with torch.no_grad():
            for conv in m.detect.m:
                conv.bias.view(m.detect.na, m.detect.no)[:, 4] = obj_logit
    # BN running stats away from (0, 1), so that fusing has something to fold
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
    names = names or [f"class{i}" for i in range(nc)]
    save_checkpoint({"model": m.state_dict(), "ema": None, "yaml": m.yaml, "names": names,
                     "anchors": m.detect.anchors, "stride": m.stride, "hyp": {}, "args": {"imgsz": imgsz},
                     "epoch": -1, "optimizer": None, "best_fitness": 0.0}, path)
    return path


def make_video(path: Path, n: int = 12, size: tuple[int, int] = (96, 64), fps: float = 10.0, seed: int = 0) -> Path:
    """Write an mp4v video of `n` frames of `size` (w, h): a coloured square moving over noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    assert writer.isOpened(), "OpenCV cannot write mp4v here"
    for i in range(n):
        img = rng.integers(90, 140, size=(h, w, 3), dtype=np.uint8)
        x = (4 * i) % max(w - 20, 1)
        cv2.rectangle(img, (x, 10), (x + 20, 30), (40, 40, 220), -1)
        writer.write(img)
    writer.release()
    return path


def make_images(folder: Path, n: int = 3, size: tuple[int, int] = (80, 60), ext: str = ".png",
                seed: int = 0) -> list[Path]:
    """Write `n` noise images with a square each, of `size` (w, h), into `folder` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files = []
    for i in range(n):
        img = rng.integers(60, 200, size=(size[1], size[0], 3), dtype=np.uint8)
        cv2.rectangle(img, (10 + i, 10), (40 + i, 40), (40, 200, 40), -1)
        files.append(folder / f"img{i}{ext}")
        cv2.imwrite(str(files[-1]), img)
    return files


class _Evil:
    """Unpickling this creates `marker`: stands for a weights file that runs code when loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (open, (self.marker, "w"))


def write_malicious(path: Path, marker: Path, use_torch: bool = True) -> Path:
    """A file whose (unsafe) unpickling creates `marker`; via `torch.save` (zip) or plain `pickle`."""
    payload = {"model": _Evil(marker), "yaml": {}, "names": ["x"]}
    if use_torch:
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    assert not marker.exists()
    return path


def run_cases_in_own_process(cases: str, timeout: int = 900) -> None:
    """Run the pytest module `cases` (a path from the repo root) in a fresh interpreter; assert that all
    of its tests passed and none was skipped (the subprocess's output tail is the failure message)."""
    from utils.core.paths import ROOT

    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", cases]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=dict(os.environ),
                         check=False)
    tail = (res.stdout + res.stderr)[-3000:]
    assert res.returncode == 0, tail
    assert " passed" in res.stdout and " failed" not in res.stdout and "skipped" not in res.stdout, tail


def png_header_only(path: Path, w: int, h: int) -> Path:
    """A PNG whose header claims w x h (8-bit RGB) with no pixel data: what PIL and a scan read first."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def assert_detect_and_val_match(pt: Path, weights: Path, tmp_path: Path, data: Path | None = None,
                                **val_kw: object) -> None:
    """detect.py gives `weights` (an export of `pt`) the .pt's boxes (1e-3) on two images, and val.py its
    mAP50 and mAP50-95 (1e-3) on `data` (default: 3 synthetic val images); `val_kw` go to both val runs."""
    import pytest

    import detect
    import val
    from utils.data.synthetic import make_synthetic_dataset

    src = tmp_path / "imgs"
    make_images(src, n=2, size=(80, 64))
    opts = {"source": src, "nosave": True, "project": tmp_path / "r", "imgsz": 64, "conf_thres": 0.25, "max_det": 4}
    a = list(detect.Detector(detect.DetectOptions(weights=pt, **opts)).frames())
    b = list(detect.Detector(detect.DetectOptions(weights=weights, **opts)).frames())
    assert len(a) == len(b) == 2 and all(len(r.det) for r in a)
    for ra, rb in zip(a, b):
        np.testing.assert_allclose(ra.det, rb.det, atol=1e-3)
    data = data or make_synthetic_dataset(tmp_path / "syn", n_train=1, n_val=3, imgsz=96, nc=2)
    common = {"imgsz": 64, "batch_size": 2, "workers": 0, "plots": False, "project": tmp_path / "v", **val_kw}
    m_pt, m_x = val.run(data, pt, **common), val.run(data, weights, **common)
    assert m_x.n_images == 3
    assert m_x.map50 == pytest.approx(m_pt.map50, abs=1e-3) and m_x.map == pytest.approx(m_pt.map, abs=1e-3)
