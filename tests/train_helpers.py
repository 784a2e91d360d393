"""Shared bits of the training tests: a tiny detector YAML and a fast hyp (no mosaic, no warm-up)."""
from __future__ import annotations

import copy

TINY_YOLO = {
    "nc": 2, "depth_multiple": 1.0, "width_multiple": 1.0,
    "anchors": [[8, 8, 14, 14, 20, 20], [24, 24, 34, 34, 48, 48]],
    "backbone": [
        [-1, 1, "Conv", [16, 3, 2]],  # 0 /2
        [-1, 1, "Conv", [32, 3, 2]],  # 1 /4
        [-1, 1, "C3", [32]],  # 2
        [-1, 1, "Conv", [48, 3, 2]],  # 3 /8
        [-1, 1, "C3", [48]],  # 4 P3
        [-1, 1, "Conv", [64, 3, 2]],  # 5 /16
        [-1, 1, "C3", [64]],  # 6 P4
    ],
    "head": [[[4, 6], 1, "Detect", ["nc", "anchors"]]],
}

# Over-fitting and smoke runs: no mosaic/affine jitter, no warm-up, an optimizer step every batch.
FAST_HYP = {"mosaic": 0.0, "mixup": 0.0, "scale": 0.0, "translate": 0.0, "fliplr": 0.0, "hsv_h": 0.0,
            "hsv_s": 0.0, "hsv_v": 0.0, "warmup_epochs": 0.0, "nbs": 4}


def tiny_yaml(nc: int = 2) -> dict:
    """A fresh copy of TINY_YOLO with `nc` classes (strides 8 and 16, about 0.1 M parameters)."""
    d = copy.deepcopy(TINY_YOLO)
    d["nc"] = nc
    return d
