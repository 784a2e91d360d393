"""Detection metrics that reproduce pycocotools' COCOeval (bbox, area "all", maxDets 100) exactly.

Inputs, per image (lists of equal length, one entry per image, in dataset order):
  preds[i]: `[n, 6]` float `x1, y1, x2, y2, conf, cls` in original-image pixels,
  gts[i]:   `[m, 5]` float `cls, x1, y1, x2, y2` in the same pixels.

COCOeval rules reproduced (pycocotools/cocoeval.py): per (image, class) detections are sorted by score
with a stable sort (ties keep input order) and only the first 100 are kept; each detection, in that
order, takes the unmatched ground truth of its class with the highest IoU >= threshold (equal IoUs go to
the later ground truth); IoU is computed from (x, y, w, h) in float64 like `maskApi.c bbIou`; per class
the kept detections of all images are stable-sorted by score (ties: earlier image first), precision gets
its monotone envelope and is sampled at 101 recall points; classes without ground truth are ignored.
Crowd/ignore regions do not exist in YOLO labels, so they are not modelled.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IOU_THRS = np.linspace(0.5, 0.95, 10)  # same values as COCOeval Params (linspace, not arange)
REC_THRS = np.linspace(0.0, 1.0, 101)
MAX_DETS = 100  # per image and class, COCOeval's largest maxDets
AREA_ALL = (0.0, 1e5 ** 2)  # COCOeval's area range "all"
CONF_GRID = np.linspace(0.0, 1.0, 1000)  # confidence axis of the P/R/F1 curves


@dataclass
class Matches:
    """Kept detections (top 100 per image and class), flattened over images.

    `img`, `pos` (row in its image's input array), `cls` int `[K]`; `conf` float64 `[K]`;
    `tp` bool `[K, T]` (True = matched at IOU_THRS[t]); `ignore` bool `[K, T]` unmatched detections whose
    area w*h is outside COCO's "all" range [0, 1e10] (only degenerate x2 < x1 boxes), neither TP nor FP;
    `n_gt` int `[nc]` ground truths per class.
    """
    img: np.ndarray
    pos: np.ndarray
    cls: np.ndarray
    conf: np.ndarray
    tp: np.ndarray
    ignore: np.ndarray
    n_gt: np.ndarray


@dataclass
class Metrics:
    """Validation results. Means are over classes that have ground truth (`ap_class`).

    `p, r, f1` at the confidence `conf_best` that maximises the mean F1 (IoU 0.5); `map50`, `map` are
    COCO mAP@0.5 and mAP@0.5:0.95. Per class arrays `[len(ap_class)]`; `nt [nc]` instances per class;
    `speed` ms per image {'pre', 'inf', 'nms'}; `loss` mean (box, obj, cls) validation loss or None.
    `curves`: {'px' [1000] conf, 'p'/'r'/'f1' [nc_gt, 1000], 'rec' [101], 'prec' [nc_gt, 101] at IoU 0.5}.
    `nimg_class [nc]` images holding each class, `coco_stats` pycocotools' stats, `confusion` matrix (val).
    """
    p: float = 0.0
    r: float = 0.0
    f1: float = 0.0
    map50: float = 0.0
    map: float = 0.0
    ap50: np.ndarray = field(default_factory=lambda: np.zeros(0))
    ap: np.ndarray = field(default_factory=lambda: np.zeros(0))
    ap_class: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    p_class: np.ndarray = field(default_factory=lambda: np.zeros(0))
    r_class: np.ndarray = field(default_factory=lambda: np.zeros(0))
    f1_class: np.ndarray = field(default_factory=lambda: np.zeros(0))
    nt: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    conf_best: float = 0.0
    n_images: int = 0
    speed: dict = field(default_factory=lambda: {"pre": 0.0, "inf": 0.0, "nms": 0.0})
    loss: np.ndarray | None = None
    curves: dict = field(default_factory=dict)
    nimg_class: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))  # images holding class c
    coco_stats: np.ndarray | None = None  # pycocotools' 12 stats when --save-json ran it
    confusion: object | None = None  # utils.eval.confusion.ConfusionMatrix filled by evaluator.evaluate

    def fitness(self) -> float:
        """Model selection score: 0.1 * mAP@0.5 + 0.9 * mAP@0.5:0.95."""
        return fitness(self.map50, self.map)

    def results_dict(self) -> dict:
        """Flat dict of the headline numbers (YOLOv5 key names) for logs and CSV rows."""
        d = {"metrics/precision": self.p, "metrics/recall": self.r, "metrics/mAP_0.5": self.map50,
             "metrics/mAP_0.5:0.95": self.map, "fitness": self.fitness()}
        if self.loss is not None:
            d.update({f"val/{k}_loss": float(v) for k, v in zip(("box", "obj", "cls"), self.loss)})
        return d


def fitness(map50: float, map5095: float) -> float:
    """0.1 * mAP@0.5 + 0.9 * mAP@0.5:0.95 (the checkpoint-selection score)."""
    return 0.1 * float(map50) + 0.9 * float(map5095)


def _as_array(x, cols: int, what: str, i: int) -> np.ndarray:
    a = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=np.float64)
    if a.size == 0:
        return np.zeros((0, cols))
    if a.ndim != 2 or a.shape[1] < cols:
        raise ValueError(f"{what}[{i}] must be [n, {cols}], got shape {a.shape}")
    if not np.isfinite(a[:, :cols]).all():
        raise ValueError(f"{what}[{i}] contains NaN or inf")
    return a[:, :cols]


def _xywh(xyxy: np.ndarray) -> np.ndarray:
    """float64 (x, y, w, h) exactly as written to COCO JSON (w = x2 - x1 in float64)."""
    return np.stack((xyxy[:, 0], xyxy[:, 1], xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]), 1)


def coco_iou(d: np.ndarray, g: np.ndarray) -> np.ndarray:
    """IoU of xywh boxes `d [..., D, 4]` with `g [..., G, 4]` -> `[..., D, G]`, op for op as maskApi bbIou."""
    d, g = d[..., :, None, :], g[..., None, :, :]
    w = np.minimum(d[..., 2] + d[..., 0], g[..., 2] + g[..., 0]) - np.maximum(d[..., 0], g[..., 0])
    h = np.minimum(d[..., 3] + d[..., 1], g[..., 3] + g[..., 1]) - np.maximum(d[..., 1], g[..., 1])
    inter = w * h
    union = d[..., 2] * d[..., 3] + g[..., 2] * g[..., 3] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union
    return np.where((w > 0) & (h > 0), iou, 0.0)


def _flatten(preds: list, gts: list) -> tuple[dict, dict]:
    if len(preds) != len(gts):
        raise ValueError(f"preds has {len(preds)} images but gts has {len(gts)}")
    p = [_as_array(x, 6, "preds", i) for i, x in enumerate(preds)]
    g = [_as_array(x, 5, "gts", i) for i, x in enumerate(gts)]
    cat = lambda arrs, cols: np.concatenate(arrs) if arrs else np.zeros((0, cols))  # noqa: E731
    pa, ga = cat(p, 6), cat(g, 5)
    for what, c in (("preds", pa[:, 5]), ("gts", ga[:, 0])):
        if (c < 0).any():
            raise ValueError(f"{what}: negative class id {c[c < 0][0]}")
    for i, x in enumerate(g):
        if ((x[:, 3] < x[:, 1]) | (x[:, 4] < x[:, 2])).any():
            raise ValueError(f"gts[{i}]: a box has x2 < x1 or y2 < y1 (labels must be cls, x1, y1, x2, y2)")
    det = {"img": np.repeat(np.arange(len(p)), [len(x) for x in p]),
           "pos": np.concatenate([np.arange(len(x)) for x in p]) if p else np.zeros(0, int),
           "box": _xywh(pa[:, :4]), "conf": pa[:, 4], "cls": pa[:, 5].round().astype(np.int64)}
    gt = {"img": np.repeat(np.arange(len(g)), [len(x) for x in g]), "box": _xywh(ga[:, 1:5]),
          "cls": ga[:, 0].round().astype(np.int64)}
    return det, gt


def _greedy_match(ious: np.ndarray, thrs: np.ndarray) -> np.ndarray:
    """COCO greedy matching for B groups at once: `ious [B, D, G]` (-1 = padding) -> tp `[B, D, T]`.

    Detections are already in score order; step r lets detection r of every group take the best free
    ground truth for every threshold simultaneously.
    """
    b, d, g = ious.shape
    thr = np.minimum(thrs, 1 - 1e-10)[None, :, None]
    taken = np.zeros((b, len(thrs), g), bool)
    tp = np.zeros((b, d, len(thrs)), bool)
    for r in range(d):
        iou_r = ious[:, r, None, :]  # [B, 1, G]
        cand = (iou_r >= thr) & ~taken
        has = cand.any(-1)
        if not has.any():
            continue
        score = np.where(cand, iou_r, -np.inf)[..., ::-1]
        best = g - 1 - score.argmax(-1)  # last index among equal IoUs, like COCOeval's `<` test
        bi, ti = np.nonzero(has)
        taken[bi, ti, best[bi, ti]] = True
        tp[:, r, :] = has
    return tp


def _chunks(dn: list[int], gn: list[int], budget: int):
    """Yield (start, stop) runs of groups whose padded size n * max(dn) * max(gn) stays within `budget`.

    `gn` is ascending, so the last group of a run has the run's largest ground-truth count.
    """
    start, dmax = 0, 0
    for k, (d, g) in enumerate(zip(dn, gn)):
        grown = max(dmax, d)
        if k > start and (k - start + 1) * grown * g > budget:
            yield start, k
            start, grown = k, d
        dmax = grown
    if dn:
        yield start, len(dn)


def _group_slices(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For sorted `keys`: unique values, start index and count of each run."""
    uniq, start, count = np.unique(keys, return_index=True, return_counts=True)
    return uniq, start, count


def match_detections(preds: list, gts: list, nc: int, max_dets: int = MAX_DETS,
                     chunk_elems: int = 4_000_000) -> Matches:
    """COCOeval per-image evaluation for all images and classes -> `Matches` (see module docstring).

    Groups (image, class) are processed in padded chunks of about `chunk_elems` IoU entries.
    """
    det, gt = _flatten(preds, gts)
    ncls = max(nc, int(det["cls"].max(initial=-1)) + 1, int(gt["cls"].max(initial=-1)) + 1)
    dkey, gkey = det["img"] * ncls + det["cls"], gt["img"] * ncls + gt["cls"]
    order = np.lexsort((det["pos"], -det["conf"], dkey))  # group, then stable score order within it
    dgroups, dstart, dcount = _group_slices(dkey[order])
    rank = np.arange(len(order)) - np.repeat(dstart, dcount)
    order = order[rank < max_dets]  # COCOeval keeps the best `max_dets` per (image, class)
    dcount = np.minimum(dcount, max_dets)
    dstart = np.cumsum(dcount) - dcount

    gorder = np.argsort(gkey, kind="stable")
    ggroups, gstart, gcount = _group_slices(gkey[gorder])
    gidx = np.searchsorted(ggroups, dgroups)
    has_gt = (gidx < len(ggroups)) & (ggroups[np.minimum(gidx, len(ggroups) - 1)] == dgroups) if len(ggroups) \
        else np.zeros(len(dgroups), bool)
    tp = np.zeros((len(order), len(IOU_THRS)), bool)
    both = np.nonzero(has_gt)[0]
    both = both[np.argsort(gcount[gidx[both]], kind="stable")]  # similar sizes share a chunk: less padding
    for i, j in _chunks(dcount[both].tolist(), gcount[gidx[both]].tolist(), chunk_elems):
        grp = both[i:j]
        tp_rows = _match_chunk(grp, dstart, dcount, gidx, gstart, gcount, order, gorder, det, gt)
        rows = np.concatenate([np.arange(dstart[k], dstart[k] + dcount[k]) for k in grp])
        tp[rows] = tp_rows
    n_gt = np.bincount(gt["cls"], minlength=ncls)
    box = det["box"][order]
    area = box[:, 2] * box[:, 3]
    ignore = ~tp & ((area < AREA_ALL[0]) | (area > AREA_ALL[1]))[:, None]
    return Matches(img=det["img"][order], pos=det["pos"][order], cls=det["cls"][order],
                   conf=det["conf"][order], tp=tp, ignore=ignore, n_gt=n_gt)


def _match_chunk(grp, dstart, dcount, gidx, gstart, gcount, order, gorder, det, gt) -> np.ndarray:
    """Pad the groups `grp` into `[B, D, G]`, match, and return tp rows in kept-detection order."""
    dmax, gmax = int(dcount[grp].max()), int(gcount[gidx[grp]].max())
    dbox = np.zeros((len(grp), dmax, 4))
    gbox = np.zeros((len(grp), gmax, 4))
    dvalid = np.arange(dmax)[None] < dcount[grp][:, None]
    gvalid = np.arange(gmax)[None] < gcount[gidx[grp]][:, None]
    drow = (dstart[grp][:, None] + np.arange(dmax)[None])[dvalid]
    grow = (gstart[gidx[grp]][:, None] + np.arange(gmax)[None])[gvalid]
    dbox[dvalid] = det["box"][order[drow]]
    gbox[gvalid] = gt["box"][gorder[grow]]
    ious = np.where(dvalid[:, :, None] & gvalid[:, None, :], coco_iou(dbox, gbox), -1.0)
    return _greedy_match(ious, IOU_THRS)[dvalid]


def coco_ap(m: Matches) -> tuple[np.ndarray, np.ndarray]:
    """COCOeval accumulate -> (`ap [C, T]`, `prec [C, T, 101]`) for classes C = `nonzero(m.n_gt)`."""
    classes = np.nonzero(m.n_gt)[0]
    ap = np.zeros((len(classes), len(IOU_THRS)))
    prec = np.zeros((len(classes), len(IOU_THRS), len(REC_THRS)))
    for ci, c in enumerate(classes):
        sel = np.nonzero(m.cls == c)[0]
        sel = sel[np.lexsort((m.pos[sel], m.img[sel], -m.conf[sel]))]  # == COCOeval's stable concat+sort
        tps = m.tp[sel].T  # [T, n]
        if tps.shape[1] == 0:
            continue
        tp_sum = np.cumsum(tps, axis=1).astype(float)
        fp_sum = np.cumsum(~tps & ~m.ignore[sel].T, axis=1).astype(float)
        rc = tp_sum / m.n_gt[c]
        pr = tp_sum / (fp_sum + tp_sum + np.spacing(1))
        pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]  # monotone envelope
        for t in range(len(IOU_THRS)):
            idx = np.searchsorted(rc[t], REC_THRS, side="left")
            ok = idx < tps.shape[1]
            prec[ci, t, ok] = pr[t, idx[ok]]
        ap[ci] = prec[ci].mean(1)
    return ap, prec


def prf1_curves(m: Matches, classes: np.ndarray, px: np.ndarray = CONF_GRID) -> tuple[np.ndarray, ...]:
    """Precision, recall, F1 `[C, len(px)]` at IoU 0.5 for detections with conf >= px.

    Where no detection passes, precision is 1 (nothing claimed) unless the class has no detections at
    all, which scores 0 everywhere.
    """
    p = np.zeros((len(classes), len(px)))
    r = np.zeros_like(p)
    for ci, c in enumerate(classes):
        sel = (m.cls == c) & ~m.ignore[:, 0]
        if not sel.any():
            continue
        conf, tp = m.conf[sel], m.tp[sel, 0]
        o = np.argsort(-conf, kind="stable")
        conf, tpc = conf[o], np.cumsum(tp[o])
        k = len(conf) - np.searchsorted(conf[::-1], px, side="left")  # detections with conf >= px
        hit = np.where(k > 0, tpc[np.maximum(k - 1, 0)], 0)
        p[ci] = np.where(k > 0, hit / np.maximum(k, 1), 1.0)
        r[ci] = hit / m.n_gt[c]
    f1 = 2 * p * r / (p + r + 1e-16)
    return p, r, f1


def compute_metrics(preds: list, gts: list, nc: int) -> Metrics:
    """Everything but speed and loss: COCO-exact mAP plus YOLOv5-style P/R/F1 at the best mean-F1 conf."""
    m = match_detections(preds, gts, nc)
    classes = np.nonzero(m.n_gt)[0]
    nt = np.bincount(np.concatenate([np.asarray(g)[:, 0].astype(int) for g in gts if len(g)] or [np.zeros(0, int)]),
                     minlength=nc)
    out = Metrics(nt=nt, n_images=len(gts), ap_class=classes)
    if not len(classes):
        return out
    ap, prec = coco_ap(m)
    p, r, f1 = prf1_curves(m, classes)
    best = int(f1.mean(0).argmax())
    out.ap50, out.ap = ap[:, 0], ap.mean(1)
    out.map50, out.map = float(ap[:, 0].mean()), float(ap.mean())
    out.p_class, out.r_class, out.f1_class = p[:, best], r[:, best], f1[:, best]
    out.p, out.r, out.f1 = float(p[:, best].mean()), float(r[:, best].mean()), float(f1[:, best].mean())
    out.conf_best = float(CONF_GRID[best])
    out.curves = {"px": CONF_GRID, "p": p, "r": r, "f1": f1, "rec": REC_THRS, "prec": prec[:, 0]}
    return out
