"""AutoAnchor: measure how well the anchors fit the training labels and re-fit them when they do not.

A label "fits" an anchor when both width and height ratios are within `thr` (the loss's `anchor_t`),
i.e. min(r, 1/r) over w and h is > 1/thr: exactly the rule `ComputeLoss` uses to match targets, so
the best possible recall (BPR, the share of labels some anchor can match) is an upper bound on the recall
of training. Below 0.98 we re-fit: k-means in log(w, h) space (the fit is a ratio, so log distances are
the natural metric) on scale-jittered label sizes, then a short evolution that mutates the anchors and
keeps mutations that raise the fitness (mean best ratio of the labels, zero for labels nothing fits).
New anchors are kept only if better than the old ones, sorted by area and given small-first to the
finest level. numpy only, seeded, no scipy.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

BPR_THRESHOLD = 0.98
MIN_FIT_SIZE = 2.0  # px; smaller labels are too noisy to steer k-means (they still count in the BPR)
MAX_FIT_LABELS = 30000  # subsample above this so the evolution stays a few seconds


def _best_ratio(wh: np.ndarray, k: np.ndarray) -> np.ndarray:
    """[n, m] worst-side ratio min(r, 1/r) of each label to each anchor (1 = same size)."""
    r = wh[:, None, :] / k[None, :, :]
    return np.minimum(r, 1.0 / r).min(2)


def anchor_metrics(wh: np.ndarray, k: np.ndarray, thr: float) -> tuple[float, float, float]:
    """(BPR, mean anchors above threshold per label, fitness) of anchors `k` [m, 2] for labels `wh` [n, 2]."""
    x = _best_ratio(wh, k)
    best = x.max(1)
    fits = best > 1.0 / thr
    return float(fits.mean()), float((x > 1.0 / thr).sum(1).mean()), float((best * fits).mean())


def _fitness(wh: np.ndarray, k: np.ndarray, thr: float) -> float:
    best = _best_ratio(wh, k).max(1)
    return float((best * (best > 1.0 / thr)).mean())


def kmeans_log(wh: np.ndarray, n: int, rng: np.random.Generator, iters: int = 50) -> np.ndarray:
    """`n` cluster centres [n, 2] of label sizes `wh` [N, 2] (N >= n), k-means++ seeded, in log space."""
    x = np.log(wh)
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, n):  # k-means++: next centre far from the chosen ones
        d2 = ((x[:, None] - np.array(centres)[None]) ** 2).sum(2).min(1)
        p = d2 / d2.sum() if d2.sum() > 0 else None
        centres.append(x[rng.choice(len(x), p=p)])
    c = np.array(centres)
    assign = None
    for _ in range(iters):
        d2 = ((x[:, None] - c[None]) ** 2).sum(2)
        new = d2.argmin(1)
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        for j in range(n):
            members = x[assign == j]
            # an empty cluster restarts at the point worst served by the others
            c[j] = members.mean(0) if len(members) else x[d2.min(1).argmax()]
    return np.exp(c)


def evolve_anchors(wh: np.ndarray, k: np.ndarray, thr: float, rng: np.random.Generator,
                   generations: int = 300, mutation_p: float = 0.9, sigma: float = 0.1) -> np.ndarray:
    """Hill-climb anchors `k` [m, 2] on the fitness by multiplicative log-normal mutations."""
    best, f = k.copy(), _fitness(wh, k, thr)
    for _ in range(generations):
        mask = rng.random(best.shape) < mutation_p
        if not mask.any():
            continue
        step = sigma * rng.random()  # varied step size: big jumps early, fine tuning possible throughout
        cand = best * np.exp(mask * rng.standard_normal(best.shape) * step)
        fc = _fitness(wh, cand, thr)
        if fc > f:
            best, f = cand, fc
    return best


def fit_anchors(wh: np.ndarray, n: int, thr: float, seed: int = 0, generations: int = 300) -> np.ndarray:
    """`n` new anchors [n, 2] px for labels `wh` [N, 2] px, sorted by area (smallest first)."""
    rng = np.random.default_rng(seed)
    fit = wh[(wh >= MIN_FIT_SIZE).all(1)]
    if len(fit) < n:
        fit = wh
    if len(fit) > MAX_FIT_LABELS:
        fit = fit[rng.choice(len(fit), MAX_FIT_LABELS, replace=False)]
    # scale jitter so the anchors do not over-fit the exact sizes of one resize setting
    fit = fit * rng.uniform(0.9, 1.1, size=(len(fit), 1))
    k = kmeans_log(fit, n, rng)
    k = evolve_anchors(fit, k, thr, rng, generations=generations)
    return k[np.argsort(k.prod(1))]


def _as_numpy(a: Any, name: str, ndim: int) -> np.ndarray:
    arr = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    arr = arr.astype(np.float64)
    if arr.ndim != ndim or arr.shape[-1] != 2:
        raise ValueError(f'check_anchors: {name} must be {"[n, 2]" if ndim == 2 else "[nl, na, 2]"}, '
                         f'got shape {arr.shape}')
    return arr


def check_anchors(wh: np.ndarray, anchors: np.ndarray | torch.Tensor, thr: float = 4.0, seed: int = 0,
                  generations: int = 300) -> tuple[np.ndarray | torch.Tensor | None, str]:
    """Check anchors against label sizes; re-fit them when the BPR is below 0.98.

    `wh`: [n, 2] label (w, h) in pixels at the training size; `anchors`: [nl, na, 2] pixels, finest level
    first. Returns `(new_anchors, report)`: `new_anchors` has the type, dtype and shape of `anchors`, or
    is None when the current ones are kept; `report` is a one-line summary. Raises ValueError for bad
    shapes or non-finite / negative sizes (naming the row); zero-size labels are ignored.
    """
    wh = _as_numpy(wh, 'wh', 2)
    k = _as_numpy(anchors, 'anchors', 3)
    if thr <= 1:
        raise ValueError(f'check_anchors: thr must be > 1, got {thr}')
    bad = ~np.isfinite(wh).all(1) | (wh < 0).any(1)
    if bad.any():
        raise ValueError(f'check_anchors: label size row {int(bad.argmax())} is {wh[bad.argmax()].tolist()}; '
                         'sizes must be finite and >= 0')
    if not np.isfinite(k).all() or (k <= 0).any():
        raise ValueError('check_anchors: anchors must be finite and > 0 pixels')
    wh = wh[(wh > 0).all(1)]
    flat = k.reshape(-1, 2)
    if len(wh) == 0:
        return None, 'AutoAnchor: no labels with a size, anchors kept.'
    bpr, aat, fit = anchor_metrics(wh, flat, thr)
    head = f'AutoAnchor: {aat:.2f} anchors/target, best possible recall {bpr:.4f} (thr {thr:g})'
    if bpr >= BPR_THRESHOLD:
        return None, f'{head}, current anchors fit the data, kept.'
    if len(wh) < len(flat):
        return None, f'{head}; only {len(wh)} labels for {len(flat)} anchors, too few to re-fit, kept.'
    new = fit_anchors(wh, len(flat), thr, seed=seed, generations=generations)
    bpr2, _, fit2 = anchor_metrics(wh, new, thr)
    if (bpr2, fit2) <= (bpr, fit):
        return None, f'{head}; re-fit reached BPR {bpr2:.4f}, not better, original anchors kept.'
    new = new.reshape(k.shape)
    if isinstance(anchors, torch.Tensor):
        out: np.ndarray | torch.Tensor = torch.as_tensor(new, dtype=anchors.dtype, device=anchors.device)
    else:
        out = new.astype(np.asarray(anchors).dtype)
    return out, f'{head}; new anchors BPR {bpr2:.4f} (fitness {fit:.3f} -> {fit2:.3f}), applied.'


def dataset_wh(labels: list[np.ndarray], shapes: np.ndarray, imgsz: int,
               files: list[str] | None = None) -> np.ndarray:
    """Label sizes [n, 2] in pixels at `imgsz` (longest image side resized to it).

    `labels[i]`: [n_i, 5] (cls, cx, cy, w, h) normalised to image i; `shapes`: [len(labels), 2] (w, h).
    """
    shapes = np.asarray(shapes, dtype=np.float64).reshape(-1, 2)
    if len(shapes) != len(labels):
        raise ValueError(f'autoanchor: {len(labels)} label arrays but {len(shapes)} image shapes')
    rows = []
    for i, lab in enumerate(labels):
        lab = np.asarray(lab, dtype=np.float64)
        if lab.size == 0:
            continue
        if lab.ndim != 2 or lab.shape[1] != 5:
            where = files[i] if files is not None and i < len(files) else f'image {i}'
            raise ValueError(f'autoanchor: labels of {where} must be [n, 5] (cls, cx, cy, w, h), got {lab.shape}')
        rows.append(lab[:, 3:5] * shapes[i] * (imgsz / shapes[i].max()))
    return np.concatenate(rows, 0) if rows else np.zeros((0, 2))


def autoanchor(dataset: Any, model_anchors: torch.Tensor, strides: torch.Tensor, imgsz: int,
               thr: float = 4.0, seed: int = 0, verbose: bool = True) -> tuple[torch.Tensor | None, str]:
    """Run `check_anchors` on a dataset (`.labels`, `.shapes`, optional `.im_files`, see CONTRACTS.md).

    `model_anchors` [nl, na, 2] px, `strides` [nl]. Returns (new anchors like `model_anchors`, ordered
    like `strides`, small anchors on the smallest stride; or None when kept) and prints the report.
    The caller copies them into the model's Detect buffer (then builds `ComputeLoss`).
    """
    wh = dataset_wh(dataset.labels, dataset.shapes, imgsz, getattr(dataset, 'im_files', None))
    anchors = torch.as_tensor(model_anchors)
    order = np.argsort(torch.as_tensor(strides).detach().cpu().numpy().reshape(-1), kind='stable')
    if len(order) != anchors.shape[0]:
        raise ValueError(f'autoanchor: {len(order)} strides for {anchors.shape[0]} anchor levels')
    new, report = check_anchors(wh, anchors.detach().cpu().numpy()[order], thr=thr, seed=seed)
    if verbose:
        print(report)
    if new is None:
        return None, report
    out = np.empty_like(new)
    out[order] = new  # back to the model's level order
    return torch.as_tensor(out, dtype=anchors.dtype, device=anchors.device), report

