"""Tiny generated detection datasets for tests and smoke runs (no downloads).

Each image is a plain grey-noise background with 1..`max_objects` filled squares; the class is the
square's colour (class 0 red, 1 green, 2 blue, ...), so a small model can learn it in a few steps.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import yaml

COLORS_BGR = [(40, 40, 220), (40, 200, 40), (220, 60, 40), (30, 200, 220), (200, 40, 200), (220, 220, 40)]


def draw_sample(rng: np.random.Generator, imgsz: int | tuple[int, int], nc: int, max_objects: int,
                min_size: float = 0.15, max_size: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    """One BGR uint8 image of shape (h, w, 3) and its labels [n, 5] (cls, cx, cy, w, h normalised).

    Squares do not overlap, so every box encloses exactly one square.
    """
    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
    img = rng.integers(90, 140, size=(h, w, 3), dtype=np.uint8)
    labels, placed = [], []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(20):
            side = int(rng.uniform(min_size, max_size) * min(h, w))
            x1, y1 = int(rng.integers(0, w - side)), int(rng.integers(0, h - side))
            box = (x1, y1, x1 + side, y1 + side)
            if all(box[2] <= p[0] or box[0] >= p[2] or box[3] <= p[1] or box[1] >= p[3] for p in placed):
                break
        else:
            continue
        cls = int(rng.integers(0, nc))
        cv2.rectangle(img, box[:2], (box[2] - 1, box[3] - 1), COLORS_BGR[cls % len(COLORS_BGR)], thickness=-1)
        placed.append(box)
        labels.append([cls, (box[0] + box[2]) / 2 / w, (box[1] + box[3]) / 2 / h, side / w, side / h])
    return img, np.array(labels, dtype=np.float32).reshape(-1, 5)


def make_synthetic_dataset(root: str | Path, n_train: int = 8, n_val: int = 4, imgsz: int | tuple[int, int] = 128,
                           nc: int = 2, seed: int = 0, max_objects: int = 3, same_val: bool = False) -> Path:
    """Write a YOLO-layout dataset under `root` and return the path of its data YAML.

    Layout: `root/images/{train,val}/*.jpg`, `root/labels/{train,val}/*.txt`, `root/data.yaml`.
    With `same_val`, the val split is a copy of the train split (for over-fitting tests).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    splits = {"train": n_train} if same_val else {"train": n_train, "val": n_val}
    for split, n in splits.items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, labels = draw_sample(rng, imgsz, nc, max_objects)
            cv2.imwrite(str(root / "images" / split / f"{split}_{i:04d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
            rows = [f"{int(c)} {x:.6f} {y:.6f} {bw:.6f} {bh:.6f}" for c, x, y, bw, bh in labels]
            (root / "labels" / split / f"{split}_{i:04d}.txt").write_text("\n".join(rows) + "\n")
    cfg = {"path": str(root.resolve()), "train": "images/train", "val": "images/train" if same_val else "images/val",
           "nc": nc, "names": {i: f"class{i}" for i in range(nc)}}
    data_yaml = root / "data.yaml"
    data_yaml.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return data_yaml
