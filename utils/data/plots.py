"""What the model is fed: `labels.jpg` (label statistics) and `train_batch*.jpg` (augmented batches with boxes)."""
from __future__ import annotations

import math
from pathlib import Path
from collections.abc import Sequence

import cv2
import numpy as np
import torch

from utils.core.draw import class_color, draw_boxes
from utils.ops.boxes import xywhn2xyxy


def plot_labels(labels: Sequence[np.ndarray], names: Sequence[str], save_dir: str | Path) -> Path:
    """Write `save_dir/labels.jpg`: instances per class, box centres (x, y) and box sizes (w, h).

    `labels` is a list of [n, 5] arrays (cls, cx, cy, w, h) normalised, as `YoloDataset.labels`.
    """
    import matplotlib
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    lab = np.concatenate([np.asarray(lb, np.float32).reshape(-1, 5) for lb in labels], 0) if len(labels) else \
        np.zeros((0, 5), np.float32)
    nc = max(len(names), int(lab[:, 0].max()) + 1 if len(lab) else 0)
    cls = lab[:, 0].astype(int)
    colors = np.array([class_color(c)[::-1] for c in range(max(nc, 1))], float) / 255  # BGR -> RGB for matplotlib
    fig, ax = plt.subplots(1, 3, figsize=(15, 5), tight_layout=True)
    counts = np.bincount(cls, minlength=nc)
    ax[0].bar(range(nc), counts, color=colors[:nc])
    ax[0].set_xticks(range(nc))
    ax[0].set_xticklabels([names[i] if i < len(names) else str(i) for i in range(nc)], rotation=90 if nc > 10 else 0)
    ax[0].set_ylabel("instances")
    ax[0].set_title(f"{len(lab)} boxes in {len(labels)} images")
    for k, (a, b, title) in enumerate(((1, 2, "box centres (x, y)"), (3, 4, "box sizes (width, height)")), 1):
        pt = np.full(len(lab), 2.0) if len(lab) < 5000 else np.full(len(lab), 0.5)
        ax[k].scatter(lab[:, a], lab[:, b], s=pt, c=colors[cls] if len(lab) else None, alpha=0.5, linewidths=0)
        ax[k].set_xlim(0, 1)
        ax[k].set_ylim(0, 1)
        ax[k].set_title(title)
        ax[k].set_xlabel("x" if a == 1 else "width")
        ax[k].set_ylabel("y" if b == 2 else "height")
    ax[1].invert_yaxis()  # image coordinates: y grows downwards
    out = Path(save_dir) / "labels.jpg"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_train_batch(imgs: torch.Tensor | np.ndarray, targets: torch.Tensor | np.ndarray, paths: Sequence[str] | None,
                     fname: str | Path, names: Sequence[str] | None = None, max_subplots: int = 16,
                     max_size: int = 1920) -> Path:
    """Tile a batch (uint8 [B, 3, H, W] RGB, targets [N, 6] (index, cls, cx, cy, w, h) normalised) into one
    JPEG with its boxes and class names drawn, file names on top; returns the path written."""
    imgs = imgs.cpu().numpy() if isinstance(imgs, torch.Tensor) else np.asarray(imgs)
    targets = targets.cpu().numpy() if isinstance(targets, torch.Tensor) else np.asarray(targets)
    if imgs.dtype != np.uint8:  # a float batch in 0..1
        imgs = (np.clip(imgs, 0, 1) * 255).astype(np.uint8)
    bs, _, h, w = imgs.shape
    bs = min(bs, max_subplots)
    ns = math.ceil(bs ** 0.5)
    scale = min(1.0, max_size / (ns * max(h, w)))
    th, tw = int(h * scale), int(w * scale)
    mosaic = np.full((ns * th, ns * tw, 3), 255, np.uint8)
    for i in range(bs):
        tile = cv2.resize(np.ascontiguousarray(imgs[i].transpose(1, 2, 0)[:, :, ::-1]), (tw, th))
        t = targets[targets[:, 0] == i]
        boxes = xywhn2xyxy(t[:, 2:6].astype(np.float64), tw, th)
        classes = t[:, 1].astype(int)
        draw_boxes(tile, boxes, classes, names=names, line_thickness=1)
        if paths is not None:
            cv2.putText(tile, Path(paths[i]).name[:40], (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1,
                        cv2.LINE_AA)
        y, x = (i // ns) * th, (i % ns) * tw
        mosaic[y:y + th, x:x + tw] = tile
        cv2.rectangle(mosaic, (x, y), (x + tw - 1, y + th - 1), (255, 255, 255), 2)
    out = Path(fname)
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), mosaic)
    return out
