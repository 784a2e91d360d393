"""Training augmentations on BGR uint8 images and pixel boxes.

Boxes here are `labels [n, 5] = (cls, x1, y1, x2, y2)` in pixels of the current image. Every random
draw comes from the `rng` passed in, so a result is a pure function of (inputs, rng state).
"""
from __future__ import annotations


import cv2
import numpy as np

FILL = 114  # grey used for padding and empty mosaic areas (same as letterbox)


def augment_hsv(img: np.ndarray, rng: np.random.Generator, hgain: float = 0.5, sgain: float = 0.5,
                vgain: float = 0.5) -> np.ndarray:
    """Random hue shift and saturation/value gains, in place on a BGR uint8 image; returns it."""
    if not (hgain or sgain or vgain):
        return img
    r = rng.uniform(-1, 1, 3) * (hgain, sgain, vgain) + 1
    hue, sat, val = cv2.split(cv2.cvtColor(img, cv2.COLOR_BGR2HSV))
    x = np.arange(256, dtype=np.float32)
    # look-up tables: one pass per channel instead of per-pixel float math
    lut_h = ((x * r[0]) % 180).astype(np.uint8)
    lut_s = np.clip(x * r[1], 0, 255).astype(np.uint8)
    lut_v = np.clip(x * r[2], 0, 255).astype(np.uint8)
    hsv = cv2.merge((cv2.LUT(hue, lut_h), cv2.LUT(sat, lut_s), cv2.LUT(val, lut_v)))
    cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR, dst=img)
    return img


def box_candidates(before: np.ndarray, after: np.ndarray, wh_thr: float = 2, ar_thr: float = 20,
                   area_thr: float = 0.1, eps: float = 1e-16) -> np.ndarray:
    """Keep mask for boxes [n, 4] xyxy after a transform: > wh_thr px wide and high, aspect < ar_thr,
    and at least area_thr of the (scale-adjusted) original area left (i.e. not mostly cut off)."""
    w1, h1 = before[:, 2] - before[:, 0], before[:, 3] - before[:, 1]
    w2, h2 = after[:, 2] - after[:, 0], after[:, 3] - after[:, 1]
    ar = np.maximum(w2 / (h2 + eps), h2 / (w2 + eps))
    return (w2 > wh_thr) & (h2 > wh_thr) & (w2 * h2 / (w1 * h1 + eps) > area_thr) & (ar < ar_thr)


def _affine_matrix(rng: np.random.Generator, size: tuple[int, int], in_size: tuple[int, int], degrees: float,
                   translate: float, scale: float, shear: float, perspective: float) -> tuple[np.ndarray, float]:
    """3x3 matrix mapping input pixels to output pixels, and the scale drawn."""
    (h_in, w_in), (h, w) = in_size, size
    C = np.eye(3)
    C[0, 2], C[1, 2] = -w_in / 2, -h_in / 2  # rotate/scale/shear about the input centre
    P = np.eye(3)
    P[2, 0], P[2, 1] = rng.uniform(-perspective, perspective, 2)
    R = np.eye(3)
    s = rng.uniform(1 - scale, 1 + scale)
    R[:2] = cv2.getRotationMatrix2D(center=(0, 0), angle=rng.uniform(-degrees, degrees), scale=s)
    S = np.eye(3)
    S[0, 1], S[1, 0] = np.tan(np.deg2rad(rng.uniform(-shear, shear, 2)))
    T = np.eye(3)
    T[0, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * w
    T[1, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * h
    return T @ S @ R @ P @ C, s


def random_perspective(img: np.ndarray, labels: np.ndarray, rng: np.random.Generator, degrees: float = 0.0,
                       translate: float = 0.1, scale: float = 0.5, shear: float = 0.0, perspective: float = 0.0,
                       out_size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Random rotation/scale/shear/translation/perspective -> (img [out h, out w, 3], labels kept).

    `out_size` (h, w) defaults to the input size; a mosaic passes half its canvas, which crops it.
    Each box becomes the bounding box of its 4 transformed corners, clipped to the output, and is
    dropped by `box_candidates` when too small, too thin or mostly outside.
    """
    h, w = out_size or img.shape[:2]
    M, s = _affine_matrix(rng, (h, w), img.shape[:2], degrees, translate, scale, shear, perspective)
    if perspective:
        img = cv2.warpPerspective(img, M, dsize=(w, h), borderValue=(FILL, FILL, FILL))
    else:
        img = cv2.warpAffine(img, M[:2], dsize=(w, h), borderValue=(FILL, FILL, FILL))
    n = len(labels)
    if not n:
        return img, labels
    corners = np.ones((n * 4, 3))
    corners[:, :2] = labels[:, [1, 2, 3, 4, 1, 4, 3, 2]].reshape(n * 4, 2)  # x1y1, x2y2, x1y2, x2y1
    xy = corners @ M.T
    xy = (xy[:, :2] / xy[:, 2:3] if perspective else xy[:, :2]).reshape(n, 8)
    x, y = xy[:, [0, 2, 4, 6]], xy[:, [1, 3, 5, 7]]
    new = np.stack((x.min(1), y.min(1), x.max(1), y.max(1)), 1)
    new[:, [0, 2]] = new[:, [0, 2]].clip(0, w)
    new[:, [1, 3]] = new[:, [1, 3]].clip(0, h)
    keep = box_candidates(labels[:, 1:5] * s, new)
    out = labels[keep].copy()
    out[:, 1:5] = new[keep]
    return img, out


def mosaic4(imgs: list[np.ndarray], labels: list[np.ndarray], s: int, rng: np.random.Generator,
            canvas: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Tile 4 images (each long side <= s) around a random centre on a 2s x 2s grey canvas.

    `labels[i]` is [n, 5] (cls, x1, y1, x2, y2) in pixels of `imgs[i]`. Returns the canvas and all
    labels shifted into it (not yet clipped; `random_perspective` clips and crops to s x s).
    A caller may pass a reusable uint8 [2s, 2s, 3] `canvas` buffer: it is overwritten and returned
    (a fresh 2s x 2s allocation per item costs more in page faults than the fill itself).
    """
    if canvas is None or canvas.shape != (2 * s, 2 * s, 3):
        canvas = np.empty((2 * s, 2 * s, 3), dtype=np.uint8)
    canvas.fill(FILL)
    xc, yc = (int(v) for v in rng.uniform(s / 2, 3 * s / 2, 2))
    out = []
    for i, (img, lab) in enumerate(zip(imgs, labels)):
        h, w = img.shape[:2]
        # canvas corner region (a) and the image region that fills it (b), per quadrant
        if i == 0:  # top-left: image's bottom-right corner sits at the centre
            ax1, ay1, ax2, ay2 = max(xc - w, 0), max(yc - h, 0), xc, yc
            bx1, by1 = w - (ax2 - ax1), h - (ay2 - ay1)
        elif i == 1:  # top-right
            ax1, ay1, ax2, ay2 = xc, max(yc - h, 0), min(xc + w, 2 * s), yc
            bx1, by1 = 0, h - (ay2 - ay1)
        elif i == 2:  # bottom-left
            ax1, ay1, ax2, ay2 = max(xc - w, 0), yc, xc, min(2 * s, yc + h)
            bx1, by1 = w - (ax2 - ax1), 0
        else:  # bottom-right
            ax1, ay1, ax2, ay2 = xc, yc, min(xc + w, 2 * s), min(2 * s, yc + h)
            bx1, by1 = 0, 0
        canvas[ay1:ay2, ax1:ax2] = img[by1:by1 + ay2 - ay1, bx1:bx1 + ax2 - ax1]
        lab = lab.copy()
        lab[:, [1, 3]] += ax1 - bx1
        lab[:, [2, 4]] += ay1 - by1
        out.append(lab)
    return canvas, np.concatenate(out, 0) if out else np.zeros((0, 5), np.float32)


def clip_labels_to(labels: np.ndarray, w: int, h: int) -> np.ndarray:
    """Clip pixel xyxy labels to the image and drop those left with no area."""
    labels[:, [1, 3]] = labels[:, [1, 3]].clip(0, w)
    labels[:, [2, 4]] = labels[:, [2, 4]].clip(0, h)
    keep = (labels[:, 3] > labels[:, 1]) & (labels[:, 4] > labels[:, 2])
    return labels[keep]


def flip_lr(img: np.ndarray, labels_n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left-right flip of an image and its normalised (cls, cx, cy, w, h) labels."""
    labels_n = labels_n.copy()
    labels_n[:, 1] = 1 - labels_n[:, 1]
    return np.ascontiguousarray(img[:, ::-1]), labels_n


def flip_ud(img: np.ndarray, labels_n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Up-down flip of an image and its normalised (cls, cx, cy, w, h) labels."""
    labels_n = labels_n.copy()
    labels_n[:, 2] = 1 - labels_n[:, 2]
    return np.ascontiguousarray(img[::-1]), labels_n


def mixup(img1: np.ndarray, lab1: np.ndarray, img2: np.ndarray, lab2: np.ndarray, rng: np.random.Generator
          ) -> tuple[np.ndarray, np.ndarray]:
    """Blend two same-size images with a Beta(32, 32) weight and keep both label sets."""
    r = rng.beta(32.0, 32.0)
    img = cv2.addWeighted(img1, r, img2, 1 - r, 0)
    return img, np.concatenate((lab1, lab2), 0)
