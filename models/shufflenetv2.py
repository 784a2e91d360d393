"""Lightweight blocks: StemBlock (PeleeNet-style stem) and ShuffleNetV2 units (Ma et al. 2018).

Both use ReLU and YOLOv5's ceil-to-8 width rounding. All conv+BN pairs are `ConvBNAct` (fusable).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.common import ConvBNAct
from models.registry import Block, ceil8, register


def channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    """Interleave channel groups: [B, g*c, H, W] -> same shape, channel order (c, g) transposed."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


@register("StemBlock")
class StemBlock(Block):
    """Stem: conv k s -> {1x1 -> 3x3 s2 | 2x2 max-pool} -> concat -> 1x1. Args `[c2, k=3, s=2]`.

    Input [B, c1, H, W] -> [B, c2, H/(2s), W/(2s)] (4x down-sampling for the default s=2).
    """

    yaml_args = (1, 3)
    depth_rule = "none"

    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 2) -> None:
        super().__init__()
        self.stem1 = ConvBNAct(c1, c2, k, s, act=nn.ReLU())
        self.stem2a = ConvBNAct(c2, c2 // 2, 1, 1, act=nn.ReLU())
        self.stem2b = ConvBNAct(c2 // 2, c2, 3, 2, act=nn.ReLU())
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)
        self.stem3 = ConvBNAct(2 * c2, c2, 1, 1, act=nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem1(x)
        return self.stem3(torch.cat((self.stem2b(self.stem2a(x)), self.pool(x)), 1))

    @classmethod
    def channels(cls, c_in: list[int], args: list[Any], width: float) -> tuple[list[Any], int]:
        c2 = _shuffle_ch(args[0], width)
        return [cls.one_input(c_in), c2, *args[1:]], c2


def _shuffle_ch(c: Any, width: float) -> int:
    if not isinstance(c, int) or c <= 0:
        raise ValueError(f"out channels must be a positive int, got {c!r}")
    return ceil8(c * width)


@register("ShuffleV2Block", "ShuffleNetV2_InvertedResidual", "ShuffleNetV2Block")
class ShuffleV2Block(Block):
    """ShuffleNetV2 unit, args `[c2, s]`.

    s=1: split channels in half, 1x1 -> 3x3 dw -> 1x1 on one half, concat, shuffle (needs c1 == c2).
    s=2: both branches see the whole input (dw s2 -> 1x1 | 1x1 -> dw s2 -> 1x1), concat, shuffle.
    Output [B, c2, ceil(H/s), ceil(W/s)].
    """

    yaml_args = (2, 2)

    def __init__(self, c1: int, c2: int, s: int) -> None:
        super().__init__()
        if s not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {s}")
        if c2 % 2:
            raise ValueError(f"out channels must be even, got {c2}")
        if s == 1 and c1 != c2:
            raise ValueError(f"a stride-1 unit needs in == out channels, got {c1} -> {c2}")
        self.stride = s
        half = c2 // 2
        if s == 2:
            self.branch1 = nn.Sequential(
                ConvBNAct(c1, c1, 3, s, g=c1, act=False),
                ConvBNAct(c1, half, 1, 1, act=nn.ReLU()))
        else:
            self.branch1 = None
        c_in2 = c1 if s == 2 else half
        self.branch2 = nn.Sequential(
            ConvBNAct(c_in2, half, 1, 1, act=nn.ReLU()),
            ConvBNAct(half, half, 3, s, g=half, act=False),
            ConvBNAct(half, half, 1, 1, act=nn.ReLU()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.branch1 is None:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), 1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), 1)
        return channel_shuffle(out, 2)

    @classmethod
    def channels(cls, c_in: list[int], args: list[Any], width: float) -> tuple[list[Any], int]:
        c1 = cls.one_input(c_in)
        c2 = _shuffle_ch(args[0], width)
        if args[1] == 1 and c1 != c2:
            raise ValueError(f"channel mismatch: a stride-1 ShuffleV2Block needs in == out, "
                             f"got in {c1}, out {c2}")
        return [c1, c2, *args[1:]], c2
