"""COCO JSON export of validation results and the pycocotools run behind `val.py --save-json`.

Conventions: image `id` = index of the image in the dataset order (0, 1, ...), category `id` = our class
index (0-based, as in YOLO label files), annotation ids start at 1 (COCOeval treats id 0 as "no match").
Boxes are `[x, y, w, h]` in original-image pixels, written at full float precision so that
pycocotools sees exactly the numbers `utils.eval.metrics` used.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np


def _rows(x, cols: int) -> np.ndarray:
    a = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=np.float64)
    return a.reshape(-1, cols) if a.size else np.zeros((0, cols))


def coco_gt_dict(gts: list, shapes: list[tuple[int, int]], names: list[str],
                 files: list[str] | None = None) -> dict:
    """Ground truth `gts[i] [m, 5]` (cls, x1, y1, x2, y2 pixels) of images of `shapes[i] = (h, w)` -> COCO dict."""
    if len(gts) != len(shapes):
        raise ValueError(f"coco_gt_dict: {len(gts)} label arrays but {len(shapes)} image shapes")
    images, anns = [], []
    for i, (g, (h, w)) in enumerate(zip(gts, shapes)):
        images.append({"id": i, "file_name": Path(files[i]).name if files else f"{i}.jpg",
                       "height": int(h), "width": int(w)})
        for c, x1, y1, x2, y2 in _rows(g, 5)[:, :5]:
            bw, bh = x2 - x1, y2 - y1
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(round(c)),
                         "bbox": [float(x1), float(y1), float(bw), float(bh)], "area": float(bw * bh),
                         "iscrowd": 0})
    return {"info": {"description": "MobileYOLO ground truth"}, "images": images, "annotations": anns,
            "categories": [{"id": i, "name": str(n)} for i, n in enumerate(names)]}


def coco_detections(preds: list) -> list[dict]:
    """Predictions `preds[i] [n, 6]` (x1, y1, x2, y2, conf, cls pixels) -> COCO results list, input order kept."""
    out = []
    for i, p in enumerate(preds):
        for x1, y1, x2, y2, conf, c in _rows(p, 6)[:, :6]:
            out.append({"image_id": i, "category_id": int(round(c)),
                        "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)], "score": float(conf)})
    return out


def save_coco_json(preds: list, gts: list, shapes: list[tuple[int, int]], names: list[str], save_dir: Path,
                   files: list[str] | None = None) -> tuple[Path, Path]:
    """Write `save_dir/gt_coco.json` and `save_dir/predictions.json`; returns (gt_path, pred_path)."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    gt_path, pred_path = save_dir / "gt_coco.json", save_dir / "predictions.json"
    gt_path.write_text(json.dumps(coco_gt_dict(gts, shapes, names, files)))
    pred_path.write_text(json.dumps(coco_detections(preds)))
    return gt_path, pred_path


def run_cocoeval(gt_json: str | Path, pred_json: str | Path, verbose: bool = True) -> np.ndarray:
    """pycocotools COCOeval (bbox) on two JSON files -> its 12 `stats` (stats[0] mAP@.5:.95, stats[1] mAP@.5).

    Prints pycocotools' summary when `verbose`. An empty prediction file gives zeros (pycocotools itself
    cannot load an empty result list).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    dets = json.loads(Path(pred_json).read_text())
    if not dets:
        if verbose:
            print(f"pycocotools: {pred_json} holds no detections; all AP/AR are 0")
        return np.zeros(12)
    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with sink:
        gt = COCO(str(gt_json))
        ev = COCOeval(gt, gt.loadRes(str(pred_json)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats, dtype=float)
