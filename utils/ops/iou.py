"""Element-wise IoU and Complete-IoU (CIoU) of paired boxes, for the box regression loss.

CIoU (Zheng et al., "Distance-IoU Loss", AAAI 2020) = IoU - rho^2 / c^2 - alpha * v where
`rho` is the distance between the two centres, `c` the diagonal of the smallest box enclosing both,
`v = 4 / pi^2 * (atan(w_gt / h_gt) - atan(w / h))^2` measures aspect-ratio disagreement and
`alpha = v / (1 - IoU + v)` weighs it. Unlike `utils.ops.boxes.box_iou` (all pairs), these functions compare
box i of `a` with box i of `b` and broadcast over any leading shape.
"""
from __future__ import annotations

import math

import torch

_FOUR_OVER_PI2 = 4.0 / math.pi ** 2


def _corners(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    half_w, half_h = b[..., 2] / 2, b[..., 3] / 2
    return b[..., 0] - half_w, b[..., 1] - half_h, b[..., 0] + half_w, b[..., 1] + half_h


def paired_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Plain IoU of paired `xywh` boxes `a` [..., 4] and `b` [..., 4] (same units) -> [...]."""
    if a.shape[-1] != 4 or b.shape[-1] != 4:
        raise ValueError(f'paired_iou expects boxes [..., 4] (cx, cy, w, h), got {tuple(a.shape)} and {tuple(b.shape)}')
    ax1, ay1, ax2, ay2 = _corners(a)
    bx1, by1, bx2, by2 = _corners(b)
    inter = (torch.min(ax2, bx2) - torch.max(ax1, bx1)).clamp(min=0) * \
            (torch.min(ay2, by2) - torch.max(ay1, by1)).clamp(min=0)
    union = a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3] - inter + eps
    return inter / union


def bbox_ciou(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Complete IoU of paired `xywh` boxes `pred` [..., 4] and `target` [..., 4] -> [...] in (-1.5, 1].

    Identical boxes give 1 (so a loss of `1 - ciou` is 0). Both boxes must be in the same units (the
    loss uses grid cells). Differentiable with respect to both inputs; `alpha` is held constant in the
    backward pass, as the paper prescribes, so the aspect term only pushes through `v`.
    """
    if pred.shape != target.shape:
        raise ValueError(f'bbox_ciou expects boxes of equal shape, got {tuple(pred.shape)} and {tuple(target.shape)}')
    iou = paired_iou(pred, target, eps)
    px1, py1, px2, py2 = _corners(pred)
    tx1, ty1, tx2, ty2 = _corners(target)
    # squared diagonal of the enclosing box
    c2 = (torch.max(px2, tx2) - torch.min(px1, tx1)) ** 2 + (torch.max(py2, ty2) - torch.min(py1, ty1)) ** 2 + eps
    rho2 = (pred[..., 0] - target[..., 0]) ** 2 + (pred[..., 1] - target[..., 1]) ** 2
    v = _FOUR_OVER_PI2 * (torch.atan(target[..., 2] / (target[..., 3] + eps))
                          - torch.atan(pred[..., 2] / (pred[..., 3] + eps))) ** 2
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - rho2 / c2 - alpha * v
