"""MobileNetV3 blocks (Howard et al. 2019) laid out as torchvision implements them.

Conventions shared with torchvision (so its state_dicts load and outputs match):
BatchNorm eps 0.001 / momentum 0.01; activation before squeeze-excite; SE squeeze channels
`make_divisible(hidden // 4, 8)` with ReLU and a hard-sigmoid gate; width scaling of out and hidden
channels with torchvision's `make_divisible` (round to nearest 8, at most 10% down).
Parameter registration order inside each block mirrors torchvision's so weights map by order.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from models.common import ConvBNAct
from models.registry import Block, make_divisible, register

BN_EPS, BN_MOMENTUM = 1e-3, 0.01


@register("h_sigmoid", "HSigmoid")
class h_sigmoid(Block):  # noqa: N801 - name used by published YAMLs
    """relu6(x + 3) / 6, elementwise (ONNX HardSigmoid)."""

    yaml_args = (0, 0)
    depth_rule = "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.hardsigmoid(x)

    @classmethod
    def channels(cls, c_in: list[int], args: list[Any], width: float) -> tuple[list[Any], int]:
        return [], cls.one_input(c_in)


@register("h_swish", "HSwish")
class h_swish(Block):  # noqa: N801
    """x * relu6(x + 3) / 6, elementwise (ONNX HardSwish)."""

    yaml_args = (0, 0)
    depth_rule = "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.hardswish(x)

    @classmethod
    def channels(cls, c_in: list[int], args: list[Any], width: float) -> tuple[list[Any], int]:
        return [], cls.one_input(c_in)


@register("SELayer", "SqueezeExcite")
class SELayer(Block):
    """Squeeze-excite: x * hsigmoid(fc2(relu(fc1(avgpool(x))))); args `[squeeze=None]`.

    `squeeze` defaults to make_divisible(c // 4, 8). fc1/fc2 are 1x1 convs with bias (torchvision).
    """

    yaml_args = (0, 1)
    depth_rule = "none"

    def __init__(self, c: int, squeeze: int | None = None) -> None:
        super().__init__()
        squeeze = squeeze or make_divisible(c // 4, 8)
        self.fc1 = nn.Conv2d(c, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fc1/fc2 as matrix products on the pooled [B, C] vector: the same numbers as the 1x1 convs, but
        # PyTorch would run a 1x1 conv on a 1x1 map through its im2col path with two copies
        h = F.relu(F.linear(x.mean((2, 3)), self.fc1.weight.flatten(1), self.fc1.bias))
        return x * F.hardsigmoid(F.linear(h, self.fc2.weight.flatten(1), self.fc2.bias))[:, :, None, None]

    def gate(self, s: torch.Tensor) -> torch.Tensor:
        """Pooled `[B, C, 1, 1]` -> channel weights `[B, C, 1, 1]` in 0..1 (the 1x1-conv form, which
        ONNX Runtime keeps in its blocked layout; see utils/export/graph.py)."""
        return F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))

    @classmethod
    def channels(cls, c_in: list[int], args: list[Any], width: float) -> tuple[list[Any], int]:
        c = cls.one_input(c_in)
        return [c, *args], c


def _mnv3_ch(c: Any, width: float, what: str) -> int:
    if not isinstance(c, int) or c <= 0:
        raise ValueError(f"{what} must be a positive int, got {c!r}")
    return make_divisible(c * width, 8)


@register("conv_bn_hswish", "ConvBNHSwish")
class conv_bn_hswish(ConvBNAct, Block):  # noqa: N801
    """k x k conv (stride s) -> BN -> h-swish: args `[c2, s, k=3]` (the MobileNetV3 stem / last conv)."""

    yaml_args = (2, 3)

    def __init__(self, c1: int, c2: int, s: int, k: int = 3) -> None:
        super().__init__(c1, c2, k, s, act=nn.Hardswish(), bn_eps=BN_EPS, bn_momentum=BN_MOMENTUM)

    @classmethod
    def channels(cls, c_in: list[int], args: list[Any], width: float) -> tuple[list[Any], int]:
        c2 = _mnv3_ch(args[0], width, "out channels")
        return [cls.one_input(c_in), c2, *args[1:]], c2


@register("MobileNetV3_InvertedResidual", "MBConv3", "InvertedResidualV3")
class MobileNetV3_InvertedResidual(Block):  # noqa: N801
    """Inverted residual: [1x1 expand] -> k x k depthwise (stride s) -> [SE] -> 1x1 project.

    YAML args `[c2, hidden, k, s, use_se, use_hs]` (input channels come from the previous row).
    No expand conv when hidden == c1; residual when s == 1 and c1 == c2. Activation is h-swish if
    `use_hs` else ReLU. Output [B, c2, ceil(H/s), ceil(W/s)].
    """

    yaml_args = (6, 6)

    def __init__(self, c1: int, c2: int, hidden: int, k: int, s: int, use_se: bool | int,
                 use_hs: bool | int) -> None:
        super().__init__()
        if s not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {s}")
        act = nn.Hardswish if use_hs else nn.ReLU
        bn = dict(bn_eps=BN_EPS, bn_momentum=BN_MOMENTUM)
        self.use_res = s == 1 and c1 == c2
        self.expand = ConvBNAct(c1, hidden, 1, act=act(), **bn) if hidden != c1 else None
        self.dw = ConvBNAct(hidden, hidden, k, s, g=hidden, act=act(), **bn)
        self.se = SELayer(hidden) if use_se else None
        self.project = ConvBNAct(hidden, c2, 1, act=False, **bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x) if self.expand is not None else x
        y = self.dw(y)
        if self.se is not None:
            y = self.se(y)
        y = self.project(y)
        return x + y if self.use_res else y

    @classmethod
    def channels(cls, c_in: list[int], args: list[Any], width: float) -> tuple[list[Any], int]:
        c2 = _mnv3_ch(args[0], width, "out channels")
        hidden = _mnv3_ch(args[1], width, "hidden channels")
        return [cls.one_input(c_in), c2, hidden, *args[2:]], c2


@register("Classify", "MobileNetV3_Classify")
class Classify(Block):
    """Classifier head: global avg-pool -> 1x1 conv to `hidden` (bias) -> h-swish -> dropout -> linear.

    YAML args `[nc, hidden=1280, dropout=0.2]`; `hidden` is width-scaled with torchvision's rule.
    Input [B, c1, H, W] -> logits [B, nc]. Same parameters as torchvision's MobileNetV3 classifier
    (its first Linear is our 1x1 conv).
    """

    yaml_args = (1, 3)
    depth_rule = "none"

    def __init__(self, c1: int, nc: int, hidden: int = 1280, dropout: float = 0.2) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, hidden, 1)
        self.drop = nn.Dropout(dropout)
        self.linear = nn.Linear(hidden, nc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.hardswish(self.conv(F.adaptive_avg_pool2d(x, 1)))
        return self.linear(self.drop(x.flatten(1)))

    @classmethod
    def channels(cls, c_in: list[int], args: list[Any], width: float) -> tuple[list[Any], int]:
        nc = args[0]
        if not isinstance(nc, int) or nc <= 0:
            raise ValueError(f"nc must be a positive int, got {nc!r}")
        hidden = _mnv3_ch(args[1] if len(args) > 1 else 1280, width, "hidden channels")
        return [cls.one_input(c_in), nc, hidden, *args[2:]], nc
