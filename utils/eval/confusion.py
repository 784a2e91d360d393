"""Detection confusion matrix with a background class, as YOLOv5 users read it.

`matrix[pred, true]`, shape `[nc + 1, nc + 1]`, index `nc` = background. A ground truth nobody found
counts in the background row (`matrix[nc, true]`), a detection that matches no ground truth in the
background column (`matrix[pred, nc]`). Matching is class-agnostic (that is how confusions show up):
pairs with IoU > `iou_thres` are taken greedily from the highest IoU, one-to-one.
"""
from __future__ import annotations

import numpy as np

from utils.ops.boxes import box_iou_np


class ConfusionMatrix:
    """Accumulates detections `[n, 6]` (x1, y1, x2, y2, conf, cls) against labels `[m, 5]` (cls, x1, y1, x2, y2).

    Only detections with conf > `conf` count (the operating point users deploy at, not the 0.001 of mAP).
    """

    def __init__(self, nc: int, conf: float = 0.25, iou_thres: float = 0.45) -> None:
        if nc < 1:
            raise ValueError(f"ConfusionMatrix: nc must be >= 1, got {nc}")
        self.nc, self.conf, self.iou_thres = int(nc), float(conf), float(iou_thres)
        self.matrix = np.zeros((self.nc + 1, self.nc + 1), dtype=np.int64)

    def _classes(self, c: np.ndarray, what: str) -> np.ndarray:
        c = np.round(c).astype(np.int64)
        bad = (c < 0) | (c >= self.nc)
        if bad.any():
            raise ValueError(f"ConfusionMatrix: {what} class {c[bad][0]} outside 0..{self.nc - 1}")
        return c

    def process_batch(self, detections, labels) -> None:
        """Add one image. Accepts numpy arrays or torch tensors; either may be empty."""
        det = np.asarray(detections.detach().cpu() if hasattr(detections, "detach") else detections, float)
        lab = np.asarray(labels.detach().cpu() if hasattr(labels, "detach") else labels, float)
        det = det.reshape(-1, 6) if det.size else np.zeros((0, 6))
        lab = lab.reshape(-1, 5) if lab.size else np.zeros((0, 5))
        det = det[det[:, 4] > self.conf]
        dc, gc = self._classes(det[:, 5], "detection"), self._classes(lab[:, 0], "label")
        d_used = np.zeros(len(det), bool)
        g_used = np.zeros(len(lab), bool)
        if len(det) and len(lab):
            iou = box_iou_np(lab[:, 1:5], det[:, :4])  # [m, n]
            gi, di = np.nonzero(iou > self.iou_thres)
            for k in np.argsort(-iou[gi, di], kind="stable"):  # greedy, best overlap first
                g, d = gi[k], di[k]
                if not (g_used[g] or d_used[d]):
                    g_used[g] = d_used[d] = True
                    self.matrix[dc[d], gc[g]] += 1
        np.add.at(self.matrix, (np.full((~g_used).sum(), self.nc), gc[~g_used]), 1)  # missed objects
        np.add.at(self.matrix, (dc[~d_used], np.full((~d_used).sum(), self.nc)), 1)  # false alarms

    def normalized(self) -> np.ndarray:
        """Column-normalised matrix (each true class sums to 1; empty columns stay 0)."""
        cols = self.matrix.sum(0, keepdims=True)
        return np.divide(self.matrix, cols, out=np.zeros(self.matrix.shape), where=cols > 0)

    def tp_fp_fn(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per class `[nc]`: correct detections, wrong or spurious detections, missed or misread objects."""
        m = self.matrix[:self.nc, :self.nc]
        tp = np.diag(m).copy()
        fp = self.matrix[:self.nc].sum(1) - tp
        fn = self.matrix[:, :self.nc].sum(0) - tp
        return tp, fp, fn
