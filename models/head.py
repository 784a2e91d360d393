"""Detect: the YOLO head. One 1x1 conv per level; returns raw (pre-sigmoid) maps, never decodes.

Decoding (see docs/CONTRACTS.md, YOLOv5 v6 rule), with s = sigmoid(raw):
`xy = (s[..., 0:2] * 2 - 0.5 + grid_xy) * stride`, `wh = (s[..., 2:4] * 2) ** 2 * anchor_px`.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from models.registry import Block, register

# YOLOv5's default COCO anchors (pixels, w h pairs) for P3/8, P4/16, P5/32.
DEFAULT_ANCHORS: list[list[int]] = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119],
                                    [116, 90, 156, 198, 373, 326]]


def anchors_tensor(anchors: Any, nl: int) -> torch.Tensor:
    """YAML anchors -> float tensor [nl, na, 2] in pixels.

    `anchors` is a list of `nl` flat lists `[w0, h0, w1, h1, ...]` (pixels, as YOLOv5 writes them),
    or an int `na` (anchors per level): then YOLOv5's defaults when nl == 3 and na == 3, else
    square/tall/wide boxes of 4 strides x 2**(j/na), assuming strides 8 * 2**i (run autoanchor).
    """
    if isinstance(anchors, bool):
        raise ValueError(f"anchors must be a list of pixel lists or an int, got {anchors!r}")
    if isinstance(anchors, int):
        if anchors <= 0:
            raise ValueError(f"anchors per level must be positive, got {anchors}")
        if nl == 3 and anchors == 3:
            anchors = DEFAULT_ANCHORS
        else:
            ratios = [(1.0, 1.0), (1.0, 2.0), (2.0, 1.0)]
            out = []
            for i in range(nl):
                level = []
                for j in range(anchors):
                    size = 32.0 * 2 ** i * 2 ** (j / anchors)
                    rw, rh = ratios[j % 3]
                    level += [size * rw / math.sqrt(rw * rh), size * rh / math.sqrt(rw * rh)]
                out.append(level)
            anchors = out
    if not isinstance(anchors, (list, tuple)) or len(anchors) != nl:
        raise ValueError(f"channel mismatch: Detect has {nl} inputs but anchors has "
                         f"{len(anchors) if isinstance(anchors, (list, tuple)) else anchors!r} levels")
    lengths = {len(a) if isinstance(a, (list, tuple)) else -1 for a in anchors}
    if len(lengths) != 1 or min(lengths) < 2 or min(lengths) % 2:
        raise ValueError(f"each anchor level must be an even-length list of w, h pixels "
                         f"with the same count per level, got {anchors!r}")
    values = [v for a in anchors for v in a]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values):
        raise ValueError(f"anchors must be positive numbers (pixels), got {anchors!r}")
    return torch.tensor(values, dtype=torch.float32).view(nl, -1, 2)


@register("Detect")
class Detect(Block):
    """YOLO head over `nl` feature maps with `na` anchors per level. YAML args `[nc, anchors]`.

    Inputs: list of `nl` tensors [B, ch[i], H_i, W_i]. Output: list of raw maps
    [B, na, H_i, W_i, 5 + nc] (x, y, w, h, obj, cls logits), in train and eval mode alike.
    Buffers: `anchors` [nl, na, 2] pixels, `stride` [nl] (filled by `Model` after probing).
    """

    yaml_args = (2, 2)
    depth_rule = "none"
    takes_list = True

    def __init__(self, nc: int, anchors: torch.Tensor, ch: list[int]) -> None:
        super().__init__()
        self.nc = int(nc)
        self.no = self.nc + 5
        self.nl, self.na = int(anchors.shape[0]), int(anchors.shape[1])
        self.register_buffer("anchors", anchors.clone().float())
        self.register_buffer("stride", torch.zeros(self.nl))
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch)

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for i, conv in enumerate(self.m):
            y = conv(x[i])
            b, _, h, w = y.shape
            out.append(y.view(b, self.na, self.no, h, w).permute(0, 1, 3, 4, 2).contiguous())
        return out

    @torch.no_grad()
    def initialize_biases(self, img_size: int = 640, objects: float = 8.0) -> None:
        """Start from sensible priors so early training is not swamped by false positives.

        Objectness logit = logit(objects per `img_size` image spread over each level's cells);
        class logit = logit(0.6 / (nc - 0.99)), i.e. a flat class prior. Needs `stride` set.
        """
        if not bool((self.stride > 0).all()):
            raise RuntimeError("Detect.stride must be set before initialize_biases()")
        p_cls = min(0.6 / (self.nc - 0.99), 0.99)
        for conv, s in zip(self.m, self.stride.tolist()):
            b = conv.bias.view(self.na, self.no)
            p_obj = min(objects / (img_size / s) ** 2, 0.99)
            b[:, 4] = math.log(p_obj / (1 - p_obj))
            b[:, 5:] = math.log(p_cls / (1 - p_cls))

    @classmethod
    def channels(cls, c_in: list[int], args: list[Any], width: float) -> tuple[list[Any], int]:
        nc = args[0]
        if not isinstance(nc, int) or isinstance(nc, bool) or nc <= 0:
            raise ValueError(f"nc must be a positive int, got {nc!r}")
        return [nc, anchors_tensor(args[1], len(c_in)), list(c_in)], nc + 5
