"""YOLOv5 building blocks (Conv, DWConv, Bottleneck, C3, SPPF, Concat, Upsample) plus DWSConv.

Every convolution followed by batch-norm in the whole model core is a `ConvBNAct`, so that
`ConvBNAct.fuse()` is the only folding code and `Model.fuse()` just visits them all.
Tensors are NCHW float; "c1"/"c2" are input/output channels.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from models.registry import Block, ceil8, register

ACTS: dict[str, type[nn.Module]] = {
    "silu": nn.SiLU, "relu": nn.ReLU, "hardswish": nn.Hardswish, "hswish": nn.Hardswish,
    "relu6": nn.ReLU6, "leakyrelu": nn.LeakyReLU, "identity": nn.Identity,
}


def make_act(act: bool | str | nn.Module | None, default: type[nn.Module] = nn.SiLU) -> nn.Module:
    """`True` -> `default()`, `False`/`None` -> Identity, a name from ACTS, or a module as is."""
    if isinstance(act, nn.Module):
        return act
    if act is True:
        return default()
    if act is False or act is None:
        return nn.Identity()
    if isinstance(act, str) and act.lower() in ACTS:
        return ACTS[act.lower()]()
    raise ValueError(f"unknown activation {act!r}; use True/False or one of {sorted(ACTS)}")


def autopad(k: int, p: int | None = None, d: int = 1) -> int:
    """'same' padding for odd kernels at stride 1 (output = ceil(input / stride) otherwise)."""
    return (d * (k - 1)) // 2 if p is None else p


class ConvBNAct(nn.Module):
    """conv (no bias) -> BatchNorm -> activation; `fuse()` folds BN into the conv.

    Output [B, c2, ceil(H/s), ceil(W/s)] for odd k with default padding.
    """

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None, g: int = 1,
                 act: bool | str | nn.Module | None = True, bn_eps: float = 1e-3,
                 bn_momentum: float = 0.03, default_act: type[nn.Module] = nn.SiLU) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p), groups=g, bias=False)
        self.bn: nn.Module = nn.BatchNorm2d(c2, eps=bn_eps, momentum=bn_momentum)
        self.act = make_act(act, default_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold BN (running stats) into conv weight and bias; BN becomes Identity. Idempotent."""
        bn = self.bn
        if not isinstance(bn, nn.BatchNorm2d):
            return
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        conv = self.conv
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                          conv.padding, conv.dilation, conv.groups, bias=True)
        fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
        fused.to(conv.weight.device)
        self.conv, self.bn = fused, nn.Identity()


def _yolo_c2(c2: Any, width: float) -> int:
    if not isinstance(c2, int) or c2 <= 0:
        raise ValueError(f"output channels must be a positive int, got {c2!r}")
    return ceil8(c2 * width)


class YoloBlock(Block):
    """YOLOv5's channel rule, shared by its blocks: args `[c2, ...]` with one input; `c2` scales by
    `width_multiple` and rounds up to a multiple of 8, the rest of the args pass through unchanged."""

    @classmethod
    def channels(cls, c_in: list[int], args: list[Any], width: float) -> tuple[list[Any], int]:
        c2 = _yolo_c2(args[0], width)
        return [cls.one_input(c_in), c2, *args[1:]], c2


@register("Conv")
class Conv(ConvBNAct, YoloBlock):
    """YOLOv5 Conv: args `[c2, k=1, s=1, p=None, g=1, act=True]` (SiLU by default)."""

    yaml_args = (1, 6)

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None, g: int = 1,
                 act: bool | str = True) -> None:
        super().__init__(c1, c2, k, s, p, g, act)


@register("DWConv")
class DWConv(ConvBNAct, YoloBlock):
    """Depthwise (grouped by gcd(c1, c2)) conv-BN-act: args `[c2, k=1, s=1, act=True]`."""

    yaml_args = (1, 4)

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, act: bool | str = True) -> None:
        super().__init__(c1, c2, k, s, g=math.gcd(c1, c2), act=act)


@register("DWSConv", "DepthwiseSeparableConv")
class DWSConv(YoloBlock):
    """Depthwise k x k (stride s) then pointwise 1x1, each conv-BN-act: args `[c2, k=3, s=1, act=True]`.

    Roughly k*k/c2 + 1 / (k*k) the cost of a dense conv, which is why the light necks use it.
    """

    yaml_args = (1, 4)

    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 1, act: bool | str = True) -> None:
        super().__init__()
        self.dw = ConvBNAct(c1, c1, k, s, g=c1, act=act)
        self.pw = ConvBNAct(c1, c2, 1, 1, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x))


@register("Bottleneck")
class Bottleneck(YoloBlock):
    """1x1 then 3x3 conv, residual when `shortcut` and c1 == c2: args `[c2, shortcut=True, g=1, e=0.5]`."""

    yaml_args = (1, 4)

    def __init__(self, c1: int, c2: int, shortcut: bool = True, g: int = 1, e: float = 0.5) -> None:
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_, c2, 3, 1, g=g)
        self.add = bool(shortcut) and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


@register("C3")
class C3(YoloBlock):
    """CSP block: two 1x1 branches, `n` Bottlenecks on one, concat, 1x1.

    YAML args `[c2, shortcut=True, g=1, e=0.5]`; the row's number (depth-scaled) becomes `n`.
    """

    yaml_args = (1, 4)
    depth_rule = "arg"

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1,
                 e: float = 0.5) -> None:
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.cv3 = Conv(2 * c_, c2, 1, 1)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, g, e=1.0) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


@register("SPPF")
class SPPF(YoloBlock):
    """Spatial pyramid pooling, fast: three chained k x k max-pools concatenated: args `[c2, k=5]`."""

    yaml_args = (1, 2)
    depth_rule = "none"

    def __init__(self, c1: int, c2: int, k: int = 5) -> None:
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_ * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


@register("Concat")
class Concat(Block):
    """Concatenate the inputs (a list of tensors with equal H, W) along `dim`: args `[dim=1]`."""

    yaml_args = (0, 1)
    depth_rule = "none"
    takes_list = True

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.d = dim

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(x, self.d)

    @classmethod
    def channels(cls, c_in: list[int], args: list[Any], width: float) -> tuple[list[Any], int]:
        if len(c_in) < 2:
            raise ValueError("Concat needs at least two inputs in `from`")
        if args and args[0] not in (1, -3):
            raise ValueError(f"Concat only supports the channel dimension (1), got {args[0]!r}")
        return list(args), sum(c_in)


@register("Upsample", "nn.Upsample")
class Upsample(nn.Upsample, Block):
    """nn.Upsample with the YOLOv5 row args `[size=None, scale_factor=2, mode='nearest']`."""

    yaml_args = (0, 3)
    depth_rule = "none"

    @classmethod
    def channels(cls, c_in: list[int], args: list[Any], width: float) -> tuple[list[Any], int]:
        return list(args), cls.one_input(c_in)
