"""Drawing boxes and labels on images (OpenCV), shared by training plots, validation plots and detect.py."""
from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

# A fixed, high-contrast palette (RGB hex) so that a class keeps its colour in every figure.
_PALETTE_HEX = ("FF3838", "2C99A8", "FF9D97", "344593", "FFB21D", "00C2FF", "CFD231", "48F90A", "92CC17",
                "3DDB86", "1A9334", "00D4BB", "FF701F", "0018EC", "8438FF", "520085", "CB38FF", "FF95C8",
                "FF37C7", "6473FF")


def class_color(i: int) -> tuple[int, int, int]:
    """The BGR colour of class `i` (cycles through a 20-colour palette)."""
    h = _PALETTE_HEX[int(i) % len(_PALETTE_HEX)]
    r, g, b = (int(h[k:k + 2], 16) for k in (0, 2, 4))
    return b, g, r


def draw_boxes(img: np.ndarray, boxes: np.ndarray | Sequence, classes: np.ndarray | Sequence,
               confs: np.ndarray | Sequence | None = None, names: Sequence[str] | dict | None = None,
               line_thickness: int = 2, hide_labels: bool = False, hide_conf: bool = False) -> np.ndarray:
    """Draw xyxy pixel `boxes` [n, 4] with class labels (and confidences) on a BGR uint8 image, in place.

    Labels read `name conf` (e.g. `RBC 0.87`); `names` maps class index to name (list or dict), falling back
    to the index. Returns the same image array for chaining.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    classes = np.asarray(classes).reshape(-1).astype(int)
    confs = None if confs is None else np.asarray(confs, dtype=np.float64).reshape(-1)
    lw = max(int(line_thickness), 1)
    font_scale = lw / 3
    for j, (box, c) in enumerate(zip(boxes, classes)):
        color = class_color(c)
        p1, p2 = (int(box[0]), int(box[1])), (int(box[2]), int(box[3]))
        cv2.rectangle(img, p1, p2, color, thickness=lw, lineType=cv2.LINE_AA)
        if hide_labels:
            continue
        name = names[c] if names is not None and (c in names if isinstance(names, dict) else c < len(names)) else str(c)
        label = name if confs is None or hide_conf else f"{name} {confs[j]:.2f}"
        (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font_scale, max(lw - 1, 1))
        above = p1[1] - th - 3 >= 0  # put the label inside the box when there is no room above it
        y_top = p1[1] - th - 3 if above else p1[1]
        cv2.rectangle(img, (p1[0], y_top), (p1[0] + tw, y_top + th + 3), color, -1, cv2.LINE_AA)
        cv2.putText(img, label, (p1[0], y_top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, font_scale,
                    (255, 255, 255), max(lw - 1, 1), cv2.LINE_AA)
    return img
