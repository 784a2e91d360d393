"""Detection loss: target-to-anchor matching, CIoU box loss, BCE objectness and BCE classes.

Contract (docs/CONTRACTS.md, "Loss"):
    loss_fn = ComputeLoss(anchors [nl, na, 2] px, strides [nl], nc, hyp)
    loss, parts = loss_fn(maps, targets)
`maps[i]` is the raw head output of level i, `[B, na, H_i, W_i, 5 + nc]` logits. `targets` is `[N, 6]` =
(image index in batch, class, cx, cy, w, h) normalised 0..1 to the batch image, whose size is derived
from the maps: `H = H_0 * stride_0`, `W = W_0 * stride_0`. `loss` is a scalar already multiplied by the
batch size (so the gradient does not shrink with small batches); `parts` is `[3]` detached
(box, obj, cls), each already multiplied by its gain, per image.

Matching. A target is given to every anchor of a level whose width and height ratios to the target are
both within `anchor_t` (max(r, 1/r) < anchor_t). Besides the cell holding its centre, it is also given to
the two neighbouring cells nearest to the centre (left or right, up or down, chosen by which half of the
cell the centre lies in) when they exist. That works because the decode rule lets a cell predict centres
from -0.5 to 1.5 cells away, and it triples the positives.

Gain scaling (hyp values are tuned for 3 levels, 80 classes and 640 px; these rescale them, YOLOv5's rule):
    box *= 3 / nl
    cls *= (nc / 80) * (3 / nl)
    obj *= (imgsz / 640) ** 2 * (3 / nl)
`imgsz` is the constructor argument when given (use the training --imgsz so rectangular batches do not
change the weighting), otherwise the longer side of each batch. Callers must pass the *unscaled* hyp.
Objectness of level i is further weighted by `level_balance(nl)[i]` ([4.0, 1.0, 0.4] for 3 levels)
because finer levels have many more (mostly negative) cells per image.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from utils.ops.iou import bbox_ciou

REQUIRED_HYP = ('box', 'obj', 'cls', 'cls_pw', 'obj_pw', 'anchor_t')
_BALANCE = {1: [1.0], 2: [4.0, 1.0], 3: [4.0, 1.0, 0.4]}
_BALANCE_DEEP = [4.0, 1.0, 0.25, 0.06, 0.02]  # 4-5 levels, e.g. P3-P6 or P2-P6 heads
# own cell, then the neighbour at -1 in x, -1 in y, +1 in x, +1 in y (grid columns: x, y)
_SHIFTS = ((0, 0), (-1, 0), (0, -1), (1, 0), (0, 1))


def level_balance(nl: int) -> list[float]:
    """Objectness weight per level, finest (smallest stride) first."""
    if nl in _BALANCE:
        return list(_BALANCE[nl])
    if nl <= len(_BALANCE_DEEP):
        return _BALANCE_DEEP[:nl]
    raise ValueError(f'no objectness balance defined for {nl} detection levels (at most {len(_BALANCE_DEEP)})')


def scaled_gains(hyp: dict, nl: int, nc: int, imgsz: float) -> tuple[float, float, float]:
    """(box, obj, cls) gains after rescaling hyp for the level count, class count and image size."""
    depth = 3.0 / nl
    return (float(hyp['box']) * depth,
            float(hyp['obj']) * (imgsz / 640.0) ** 2 * depth,
            float(hyp['cls']) * (nc / 80.0) * depth)


def bce_logits(logits: torch.Tensor, target: torch.Tensor, pos_weight: float = 1.0,
               gamma: float = 0.0, alpha: float = 0.25) -> torch.Tensor:
    """Mean BCE-with-logits; with `gamma > 0` the focal form (Lin et al. 2017) with balance `alpha`."""
    pw = torch.tensor(pos_weight, device=logits.device, dtype=logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pw, reduction='none')
    if gamma > 0:
        p = logits.sigmoid()
        p_true = target * p + (1 - target) * (1 - p)
        weight = target * alpha + (1 - target) * (1 - alpha)
        loss = loss * weight * (1.0 - p_true) ** gamma
    return loss.mean()


@dataclass
class LevelTargets:
    """Positives of one level; all tensors have M rows (one per matched anchor-cell pair).

    `b, a, gj, gi`: long [M] image, anchor, row (y) and column (x) of the cell.
    `tbox`: [M, 4] target (x, y) relative to the cell's top-left corner and (w, h), in grid cells.
    `tcls`: long [M] class. `anchors`: [M, 2] matched anchor (w, h) in grid cells.
    """
    b: torch.Tensor
    a: torch.Tensor
    gj: torch.Tensor
    gi: torch.Tensor
    tbox: torch.Tensor
    tcls: torch.Tensor
    anchors: torch.Tensor


def match_level(targets: torch.Tensor, anchors: torch.Tensor, grid_hw: tuple[int, int],
                anchor_t: float) -> LevelTargets:
    """Assign targets to (anchor, cell) pairs of one level.

    `targets`: [N, 6] (img, cls, cx, cy, w, h) in grid cells of this level; `anchors`: [na, 2] in grid
    cells; `grid_hw`: (H, W) of the level. Vectorised: no Python loop over targets.
    """
    na, n = anchors.shape[0], targets.shape[0]
    device = targets.device
    ai = torch.arange(na, device=device).repeat_interleave(n)  # anchor of each candidate
    cand = targets.repeat(na, 1)  # [na * n, 6], anchor-major to match `ai`
    ratio = cand[:, 4:6] / anchors[ai]
    # zero-size boxes give an infinite inverse ratio and are dropped here
    keep = torch.max(ratio, 1.0 / ratio).amax(1) < anchor_t
    cand, ai = cand[keep], ai[keep]

    h, w = grid_hw
    size = torch.tensor([w, h], device=device, dtype=cand.dtype)
    gxy = cand[:, 2:4]
    cell = gxy.floor().clamp(min=torch.zeros_like(size), max=size - 1)  # cx == 1.0 lands in the last cell
    frac = gxy - cell
    lower = (frac < 0.5) & (cell >= 1)
    upper = (frac > 0.5) & (cell <= size - 2)
    use = torch.stack([torch.ones_like(lower[:, 0]), lower[:, 0], lower[:, 1], upper[:, 0], upper[:, 1]])  # [5, M]
    shifts = torch.tensor(_SHIFTS, device=device, dtype=cand.dtype)[:, None, :]  # [5, 1, 2]

    cells = (cell[None] + shifts)[use]  # [M', 2]
    cand = cand[None].expand(5, -1, -1)[use]
    ai = ai[None].expand(5, -1)[use]
    gi, gj = cells[:, 0].long(), cells[:, 1].long()
    tbox = torch.cat([cand[:, 2:4] - cells, cand[:, 4:6]], 1)
    return LevelTargets(b=cand[:, 0].long(), a=ai, gj=gj, gi=gi, tbox=tbox,
                        tcls=cand[:, 1].long(), anchors=anchors[ai])


class ComputeLoss:
    """YOLO loss for raw head maps; see the module docstring for the contract, matching and gains.

    `anchors` [nl, na, 2] in pixels and `strides` [nl] are copied, so build the loss after AutoAnchor
    has changed the model's anchors. `hyp` needs `REQUIRED_HYP`; `fl_gamma` and `label_smoothing` are
    optional (default 0). `imgsz` fixes the image size used in the objectness gain (see above).
    """

    def __init__(self, anchors: torch.Tensor, strides: torch.Tensor, nc: int, hyp: dict,
                 imgsz: int | None = None) -> None:
        anchors = torch.as_tensor(anchors, dtype=torch.float32).detach().cpu().clone()
        strides = torch.as_tensor(strides, dtype=torch.float32).detach().cpu().clone().reshape(-1)
        if anchors.ndim != 3 or anchors.shape[-1] != 2:
            raise ValueError(f'ComputeLoss: anchors must be [nl, na, 2] pixels, got {tuple(anchors.shape)}')
        if strides.numel() != anchors.shape[0] or bool((strides <= 0).any()):
            raise ValueError(f'ComputeLoss: strides must be {anchors.shape[0]} positive values, got {strides.tolist()}')
        if bool((anchors <= 0).any()):
            raise ValueError('ComputeLoss: anchors must be positive pixel sizes')
        if int(nc) < 1:
            raise ValueError(f'ComputeLoss: nc must be >= 1, got {nc}')
        missing = [k for k in REQUIRED_HYP if k not in hyp]
        if missing:
            raise KeyError(f'ComputeLoss: hyp lacks {missing} (see data/hyps/default.yaml)')
        self.anchor_t = float(hyp['anchor_t'])
        if self.anchor_t <= 1:
            raise ValueError(f'ComputeLoss: hyp anchor_t must be > 1, got {self.anchor_t}')
        smooth = float(hyp.get('label_smoothing', 0.0) or 0.0)
        if not 0 <= smooth < 1:
            raise ValueError(f'ComputeLoss: hyp label_smoothing must be in [0, 1), got {smooth}')
        self.anchors, self.strides, self.nc = anchors, strides, int(nc)
        self.nl, self.na = anchors.shape[:2]
        self.hyp = dict(hyp)
        self.imgsz = imgsz
        self.balance = level_balance(self.nl)
        self.gamma = float(hyp.get('fl_gamma', 0.0) or 0.0)
        self.cls_pos, self.cls_neg = 1.0 - 0.5 * smooth, 0.5 * smooth

    def _check(self, maps: list[torch.Tensor], targets: torch.Tensor) -> None:
        """Raise ValueError naming the level or target row that breaks the contract."""
        if len(maps) != self.nl:
            raise ValueError(f'ComputeLoss: expected {self.nl} maps, got {len(maps)}')
        bs = maps[0].shape[0]
        for i, m in enumerate(maps):
            if m.ndim != 5 or m.shape[0] != bs or m.shape[1] != self.na or m.shape[4] != 5 + self.nc:
                raise ValueError(f'ComputeLoss: map {i} has shape {tuple(m.shape)}, expected '
                                 f'[{bs}, {self.na}, H, W, {5 + self.nc}]')
        if targets.ndim != 2 or targets.shape[1] != 6:
            raise ValueError(f'ComputeLoss: targets must be [N, 6] (img, cls, cx, cy, w, h), got {tuple(targets.shape)}')
        if targets.shape[0] == 0:
            return
        bad = ~torch.isfinite(targets).all(1)
        bad |= (targets[:, 0] < 0) | (targets[:, 0] >= bs) | (targets[:, 0] != targets[:, 0].round())
        bad |= (targets[:, 1] < 0) | (targets[:, 1] >= self.nc) | (targets[:, 1] != targets[:, 1].round())
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f'ComputeLoss: targets row {row} {targets[row].tolist()} is invalid: needs a finite '
                             f'image index in 0..{bs - 1} and class in 0..{self.nc - 1}')

    def build_targets(self, maps: list[torch.Tensor], targets: torch.Tensor) -> list[LevelTargets]:
        """Match normalised `targets` [N, 6] to every level of `maps`; one `LevelTargets` per level."""
        device = maps[0].device
        t = targets.to(device=device, dtype=torch.float32)
        img_h, img_w = maps[0].shape[2] * float(self.strides[0]), maps[0].shape[3] * float(self.strides[0])
        out = []
        for i, m in enumerate(maps):
            h, w = m.shape[2], m.shape[3]
            stride = float(self.strides[i])
            # normalised -> grid cells of this level (image size / stride, not h, w, so odd sizes stay exact)
            scale = torch.tensor([1, 1, img_w / stride, img_h / stride, img_w / stride, img_h / stride],
                                 device=device)
            out.append(match_level(t * scale, self.anchors[i].to(device) / stride, (h, w), self.anchor_t))
        return out

    def __call__(self, maps: list[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss of raw `maps` against normalised `targets`: (total * batch size, detached [box, obj, cls])."""
        self._check(maps, targets)
        device = maps[0].device
        bs = maps[0].shape[0]
        imgsz = self.imgsz or max(maps[0].shape[2], maps[0].shape[3]) * float(self.strides[0])
        g_box, g_obj, g_cls = scaled_gains(self.hyp, self.nl, self.nc, imgsz)
        lbox, lobj, lcls = (torch.zeros((), device=device) for _ in range(3))
        for i, (pi, lt) in enumerate(zip(maps, self.build_targets(maps, targets))):
            obj_logit = pi[..., 4].float()
            tobj = torch.zeros(obj_logit.shape, device=device)
            if lt.b.numel():
                ps = pi[lt.b, lt.a, lt.gj, lt.gi].float()  # [M, 5 + nc]
                s = ps[:, :4].sigmoid()
                pbox = torch.cat([s[:, :2] * 2 - 0.5, (s[:, 2:4] * 2) ** 2 * lt.anchors], 1)
                ciou = bbox_ciou(pbox, lt.tbox)
                lbox = lbox + (1.0 - ciou).mean()
                # a cell matched twice keeps its best IoU (amax), so the result does not depend on order
                h, w = pi.shape[2], pi.shape[3]
                flat = ((lt.b * self.na + lt.a) * h + lt.gj) * w + lt.gi
                tobj.view(-1).scatter_reduce_(0, flat, ciou.detach().clamp(min=0), reduce='amax')
                if self.nc > 1:  # a single class is fully described by objectness
                    tcls = torch.full_like(ps[:, 5:], self.cls_neg)
                    tcls[torch.arange(tcls.shape[0], device=device), lt.tcls] = self.cls_pos
                    lcls = lcls + bce_logits(ps[:, 5:], tcls, float(self.hyp['cls_pw']), self.gamma)
            lobj = lobj + bce_logits(obj_logit, tobj, float(self.hyp['obj_pw']), self.gamma) * self.balance[i]
        lbox, lobj, lcls = lbox * g_box, lobj * g_obj, lcls * g_cls
        return (lbox + lobj + lcls) * bs, torch.stack([lbox, lobj, lcls]).detach()
