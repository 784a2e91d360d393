"""Class-aware non-maximum suppression over decoded predictions (see `utils.ops.decode.decode`)."""
from __future__ import annotations

import torch
import torchvision

from utils.ops.boxes import xywh2xyxy

MAX_NMS_INPUT = 30000  # candidates per image handed to torchvision NMS; bounds time on untrained models


def _check_args(pred: torch.Tensor, conf_thres: float, iou_thres: float, max_det: int) -> None:
    if not isinstance(pred, torch.Tensor) or pred.dim() != 3 or pred.shape[-1] < 6:
        shape = tuple(pred.shape) if isinstance(pred, torch.Tensor) else type(pred).__name__
        raise ValueError(f"non_max_suppression: pred must be a [B, N, 5+nc] tensor, got {shape}")
    if not 0.0 <= conf_thres <= 1.0:
        raise ValueError(f"non_max_suppression: conf_thres={conf_thres} is outside 0..1")
    if not 0.0 <= iou_thres <= 1.0:
        raise ValueError(f"non_max_suppression: iou_thres={iou_thres} is outside 0..1")
    if max_det < 1:
        raise ValueError(f"non_max_suppression: max_det={max_det} must be >= 1")


def _candidates(x: torch.Tensor, conf_thres: float, multi_label: bool) -> torch.Tensor:
    """One image `[N, 5+nc]` -> candidate rows `[n, 6]` (x1, y1, x2, y2, conf, cls) with conf > conf_thres."""
    x = x[x[:, 4] > conf_thres]  # objectness bounds conf = obj * cls, so this cut loses nothing
    boxes = xywh2xyxy(x[:, :4])
    scores = x[:, 5:] * x[:, 4:5]
    if multi_label:
        i, j = (scores > conf_thres).nonzero(as_tuple=True)
        return torch.cat((boxes[i], scores[i, j, None], j[:, None].to(x.dtype)), 1)
    conf, j = scores.max(1, keepdim=True)
    keep = conf.view(-1) > conf_thres
    return torch.cat((boxes, conf, j.to(x.dtype)), 1)[keep]


def non_max_suppression(pred: torch.Tensor, conf_thres: float = 0.25, iou_thres: float = 0.45,
                        classes: list[int] | None = None, agnostic: bool = False, multi_label: bool = False,
                        max_det: int = 300) -> list[torch.Tensor]:
    """Decoded `pred [B, N, 5+nc]` -> per image a `[n, 6]` tensor `x1, y1, x2, y2, conf, cls`.

    conf = obj * class probability; rows with conf <= `conf_thres` are dropped. With `multi_label` a box
    yields one row per class above the threshold, otherwise only its best class. `classes` keeps only
    those class ids. NMS (`torchvision.ops.batched_nms`, boxes overlapping with IoU > `iou_thres` are
    suppressed) runs per class unless `agnostic`. Output rows are sorted by conf descending, at most
    `max_det` per image; coordinates are in the same pixels as `pred` (network input).
    """
    _check_args(pred, conf_thres, iou_thres, max_det)
    out = []
    for x in pred:
        det = _candidates(x.float(), conf_thres, multi_label)
        if classes is not None:
            det = det[torch.isin(det[:, 5], torch.as_tensor(classes, dtype=det.dtype, device=det.device))]
        if det.shape[0] > MAX_NMS_INPUT:
            det = det[det[:, 4].topk(MAX_NMS_INPUT).indices]
        if det.shape[0]:
            groups = torch.zeros_like(det[:, 5]) if agnostic else det[:, 5]
            keep = torchvision.ops.batched_nms(det[:, :4], det[:, 4], groups.long(), iou_thres)[:max_det]
            det = det[keep]
        out.append(det)
    return out
