"""Box format conversions and geometry, for torch tensors and numpy arrays alike.

Formats: `xyxy` = (x1, y1, x2, y2) corners, `xywh` = (cx, cy, w, h) centre and size, both in pixels
unless the name ends in `n` (normalised 0..1 by image width/height). Boxes are the last dimension.
"""
from __future__ import annotations

import numpy as np
import torch

Array = torch.Tensor | np.ndarray


def _empty_like(x: Array) -> Array:
    return x.clone() if isinstance(x, torch.Tensor) else np.copy(x)


def xywh2xyxy(x: Array) -> Array:
    """(cx, cy, w, h) -> (x1, y1, x2, y2), any leading shape."""
    y = _empty_like(x)
    y[..., 0] = x[..., 0] - x[..., 2] / 2
    y[..., 1] = x[..., 1] - x[..., 3] / 2
    y[..., 2] = x[..., 0] + x[..., 2] / 2
    y[..., 3] = x[..., 1] + x[..., 3] / 2
    return y


def xyxy2xywh(x: Array) -> Array:
    """(x1, y1, x2, y2) -> (cx, cy, w, h), any leading shape."""
    y = _empty_like(x)
    y[..., 0] = (x[..., 0] + x[..., 2]) / 2
    y[..., 1] = (x[..., 1] + x[..., 3]) / 2
    y[..., 2] = x[..., 2] - x[..., 0]
    y[..., 3] = x[..., 3] - x[..., 1]
    return y


def xywhn2xyxy(x: Array, w: float, h: float, padw: float = 0.0, padh: float = 0.0) -> Array:
    """Normalised (cx, cy, w, h) -> pixel (x1, y1, x2, y2) in an image of size w x h, shifted by the pad."""
    y = xywh2xyxy(x)
    y[..., [0, 2]] = y[..., [0, 2]] * w + padw
    y[..., [1, 3]] = y[..., [1, 3]] * h + padh
    return y


def xyxy2xywhn(x: Array, w: float, h: float, clip: bool = False) -> Array:
    """Pixel (x1, y1, x2, y2) -> normalised (cx, cy, w, h); with `clip`, corners are clipped to the image first."""
    if clip:
        x = clip_boxes(_empty_like(x), (h, w))
    y = xyxy2xywh(x)
    y[..., [0, 2]] = y[..., [0, 2]] / w
    y[..., [1, 3]] = y[..., [1, 3]] / h
    return y


def clip_boxes(boxes: Array, shape: tuple[int, int]) -> Array:
    """Clip xyxy boxes in place to an image of shape (h, w); returns them."""
    h, w = shape[:2]
    if isinstance(boxes, torch.Tensor):
        boxes[..., 0].clamp_(0, w)
        boxes[..., 1].clamp_(0, h)
        boxes[..., 2].clamp_(0, w)
        boxes[..., 3].clamp_(0, h)
    else:
        boxes[..., [0, 2]] = boxes[..., [0, 2]].clip(0, w)
        boxes[..., [1, 3]] = boxes[..., [1, 3]].clip(0, h)
    return boxes


def scale_boxes(img1_shape: tuple[int, int], boxes: Array, img0_shape: tuple[int, int],
                ratio_pad: tuple | None = None) -> Array:
    """Map xyxy boxes in place from a letterboxed image (h1, w1) back to the original (h0, w0).

    `ratio_pad = ((rh, rw), (padw, padh))` as stored by the loader; when None it is recomputed from the
    two shapes assuming a centred letterbox. Boxes are clipped to the original image. Returns them.
    """
    if ratio_pad is None:
        gain = min(img1_shape[0] / img0_shape[0], img1_shape[1] / img0_shape[1])
        padw = (img1_shape[1] - img0_shape[1] * gain) / 2
        padh = (img1_shape[0] - img0_shape[0] * gain) / 2
        rh = rw = gain
    else:
        (rh, rw), (padw, padh) = ratio_pad
    boxes[..., [0, 2]] = (boxes[..., [0, 2]] - padw) / rw
    boxes[..., [1, 3]] = (boxes[..., [1, 3]] - padh) / rh
    return clip_boxes(boxes, img0_shape)


def box_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """IoU of every xyxy box in `a` [N, 4] with every one in `b` [M, 4] -> [N, M]."""
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter + eps)


def box_iou_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """numpy twin of `box_iou` in float64, with pycocotools' convention (no +1 on widths) -> [N, M]."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(-1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
