"""Validation figures: PR curve, F1/P/R-vs-confidence curves, confusion matrix, GT|prediction image pairs.

Figures use `matplotlib.figure.Figure` directly (no pyplot), so nothing touches global backend state and
plotting is safe from worker threads and headless machines. Every function returns the written path.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from utils.ops.boxes import xywhn2xyxy
from utils.core.draw import draw_boxes

MAX_LEGEND = 20  # above this many classes, per-class lines are drawn grey without a legend
MIN_SIDE = 416  # GT|prediction pairs: images are drawn with a longest side of at least this many pixels


def _figure(w: float = 9, h: float = 6):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), tight_layout=True)
    return fig, fig.subplots()


def _class_lines(ax, x: np.ndarray, ys: np.ndarray, labels: list[str]) -> None:
    many = len(ys) > MAX_LEGEND
    for y, label in zip(ys, labels):
        ax.plot(x, y, linewidth=1, color="grey" if many else None, label=None if many else label)


def plot_pr_curve(metrics, names: list[str], save_dir: Path) -> Path:
    """`PR_curve.png`: COCO 101-point precision envelope at IoU 0.5 per class, AP@0.5 in the legend."""
    fig, ax = _figure()
    rec, prec = metrics.curves["rec"], metrics.curves["prec"]
    labels = [f"{names[c]} {a:.3f}" for c, a in zip(metrics.ap_class, metrics.ap50)]
    _class_lines(ax, rec, prec, labels)
    ax.plot(rec, prec.mean(0), linewidth=3, color="blue", label=f"all classes {metrics.map50:.3f} mAP@0.5")
    ax.set(xlabel="Recall", ylabel="Precision", xlim=(0, 1), ylim=(0, 1.01), title="Precision-Recall (IoU 0.5)")
    ax.legend(loc="lower left", fontsize=8)
    path = Path(save_dir) / "PR_curve.png"
    fig.savefig(path, dpi=150)
    return path


def plot_conf_curves(metrics, names: list[str], save_dir: Path) -> list[Path]:
    """`F1_curve.png`, `P_curve.png`, `R_curve.png`: metric vs confidence threshold, per class and mean."""
    px, out = metrics.curves["px"], []
    for key, title in (("f1", "F1"), ("p", "Precision"), ("r", "Recall")):
        ys = metrics.curves[key]
        fig, ax = _figure()
        _class_lines(ax, px, ys, [names[c] for c in metrics.ap_class])
        mean = ys.mean(0)
        i = int(mean.argmax()) if key == "f1" else int(np.abs(px - metrics.conf_best).argmin())
        ax.plot(px, mean, linewidth=3, color="blue", label=f"all classes {mean[i]:.2f} at {px[i]:.3f}")
        ax.set(xlabel="Confidence", ylabel=title, xlim=(0, 1), ylim=(0, 1.01), title=f"{title}-Confidence")
        ax.legend(loc="lower left", fontsize=8)
        path = Path(save_dir) / f"{'F1' if key == 'f1' else key.upper()}_curve.png"
        fig.savefig(path, dpi=150)
        out.append(path)
    return out


def plot_confusion_matrix(cm, names: list[str], save_dir: Path) -> Path:
    """`confusion_matrix.png`: counts (left) and column-normalised (right), background row and column."""
    from matplotlib.figure import Figure

    labels = [*names, "background"]
    n = len(labels)
    fig = Figure(figsize=(max(12, 1.1 * n * 2), max(5.5, 0.55 * n + 2)), tight_layout=True)
    for ax, mat, title, fmt in zip(fig.subplots(1, 2), (cm.matrix, cm.normalized()),
                                   ("Counts", "Normalised by true class"), ("{:d}", "{:.2f}")):
        im = ax.imshow(mat, cmap="Blues")
        fig.colorbar(im, ax=ax, fraction=0.046)
        ax.set(xticks=range(n), yticks=range(n), xlabel="True", ylabel="Predicted",
               title=f"{title} (conf > {cm.conf}, IoU > {cm.iou_thres})")
        ax.set_xticklabels(labels, rotation=90 if n > 8 else 0, fontsize=8)
        ax.set_yticklabels(labels, fontsize=8)
        if n <= 30:  # numbers stay legible only on small matrices
            hi = mat.max() if mat.size else 0
            for (r, c), v in np.ndenumerate(mat):
                if v:
                    ax.text(c, r, fmt.format(v), ha="center", va="center", fontsize=7,
                            color="white" if v > 0.6 * hi else "black")
    path = Path(save_dir) / "confusion_matrix.png"
    fig.savefig(path, dpi=150)
    return path


def plot_val_pairs(imgs, targets, preds: list, names: list[str], path: Path, max_images: int = 8,
                   conf: float = 0.25) -> Path:
    """One JPEG of up to `max_images` rows `ground truth | predictions (conf > conf)` on the network input.

    `imgs` uint8 `[B, 3, H, W]` RGB (tensor or array), `targets [N, 6]` (img, cls, cx, cy, w, h normalised),
    `preds[i] [n, 6]` (x1, y1, x2, y2, conf, cls) in network-input pixels.
    """
    imgs = np.asarray(imgs.cpu() if hasattr(imgs, "cpu") else imgs)
    targets = np.asarray(targets.cpu() if hasattr(targets, "cpu") else targets, dtype=np.float64).reshape(-1, 6)
    rows = []
    for i in range(min(len(imgs), max_images)):
        img = np.ascontiguousarray(imgs[i].transpose(1, 2, 0)[..., ::-1])  # RGB CHW -> BGR HWC
        f = max(1.0, MIN_SIDE / max(img.shape[:2]))  # small network inputs are enlarged so labels stay legible
        img = cv2.resize(img, None, fx=f, fy=f, interpolation=cv2.INTER_LINEAR) if f > 1 else img
        h, w = img.shape[:2]
        t = targets[targets[:, 0] == i]
        gt = draw_boxes(img.copy(), xywhn2xyxy(t[:, 2:6], w, h), t[:, 1], names=names, line_thickness=1)
        p = np.asarray(preds[i].cpu() if hasattr(preds[i], "cpu") else preds[i], dtype=np.float64).reshape(-1, 6)
        p = p[p[:, 4] > conf]
        pr = draw_boxes(img.copy(), p[:, :4] * f, p[:, 5], p[:, 4], names=names, line_thickness=1)
        for im, text in ((gt, "ground truth"), (pr, f"predictions conf>{conf}")):
            cv2.putText(im, text, (3, h - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
        sep = np.full((h, 4, 3), 255, np.uint8)
        rows.append(np.concatenate((gt, sep, pr), 1))
    width = max(r.shape[1] for r in rows)  # rect batches share a shape, but be safe
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    path = Path(path)
    cv2.imwrite(str(path), np.concatenate(rows, 0))
    return path
