"""Calibration images for every INT8 export (OpenVINO/NNCF, ONNX Runtime, and the TFLite/ExecuTorch paths).

`calibration_batches(data, imgsz)` reads the data YAML's train split, letterboxes each image to the export
size exactly as inference does (`utils.data.letterbox`, grey 114 padding, no stride rounding) and returns
float32 RGB 0..1 batches. The images are an even spread over the split (sorted paths, every k-th), so the
choice is deterministic and covers the whole split rather than its first folder.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from utils.core.errors import UserError
from utils.data.data_yaml import check_dataset, list_image_files
from utils.data.images import read_image
from utils.data.letterbox import letterbox

DEFAULT_IMAGES = 100  # export.py --calib-images: NNCF's and ORT's accuracy stops improving well before 300


class CalibrationError(UserError, ValueError):
    """A data YAML whose train split gives no usable calibration image."""


def calibration_files(data: str | Path, n: int = DEFAULT_IMAGES) -> list[str]:
    """Up to `n` image paths spread evenly over the train split of `data` (a data YAML)."""
    if n < 1:
        raise CalibrationError(f"--calib-images must be >= 1, got {n}")
    cfg = check_dataset(data)
    files = sorted(list_image_files(cfg.train)) if cfg.train else []
    if not files:
        raise CalibrationError(f"{cfg.yaml_file}: no images in the train split for INT8 calibration")
    step = max(len(files) / n, 1.0)
    return [files[int(i * step)] for i in range(min(n, len(files)))]


def calibration_batches(data: str | Path, imgsz: tuple[int, int], n: int = DEFAULT_IMAGES,
                        batch: int = 1) -> list[np.ndarray]:
    """Float32 `[batch, 3, h, w]` RGB 0..1 arrays of up to `n` train images letterboxed to `imgsz` (h, w).

    The last batch is filled up by repeating images, so every array has the export's fixed batch size.
    Unreadable images are skipped; none left raises `CalibrationError` naming the data YAML.
    """
    images = []
    for f in calibration_files(data, n):
        try:
            img = read_image(f)
        except (OSError, ValueError):
            continue
        img = letterbox(img, tuple(imgsz), auto=False)[0]
        images.append(np.ascontiguousarray(img[..., ::-1].transpose(2, 0, 1), dtype=np.float32) / 255.0)
    if not images:
        raise CalibrationError(f"{data}: none of the train images could be read for INT8 calibration")
    while len(images) % batch:
        images.append(images[len(images) % batch])
    return [np.stack(images[i:i + batch]) for i in range(0, len(images), batch)]
