"""CPU inference: depthwise convs and squeeze-excite as one C call each (`cpu_infer_kernels.c`).

At batch 1, PyTorch spends about 0.1 ms setting up each oneDNN depthwise conv, whatever its size
(torch.profiler: a `[1, 128, 10, 10]` 3x3 depthwise conv, 115 k multiply-adds, took ~100 us), and
squeeze-excite is six ATen ops (mean, two linears, relu, hardsigmoid, mul). MobileNetV3-Small-YOLO
has 17 depthwise convs and 9 squeeze-excites, yolov5n none: this per-call cost is a large part of why
the small model is slower in eager PyTorch than its FLOPs say. `swap_native` replaces them with modules
that call our kernels. Per-op timings: `python benchmarks/infer_kernels.py`.

Everything degrades: without the kernels library (no compiler, `MOBILEYOLO_CPU_KERNELS=0`) nothing is
swapped, and a swapped module given anything but a float32 CPU tensor runs the original layers it keeps.
"""
from __future__ import annotations

import torch
from torch import nn

from models.train_kernels import ACT_CODES  # both C files take the same activation codes
from utils import native
from utils.packed_conv import checked_swap

CL = torch.channels_last
ROW_ATTRS = ("i", "f", "type", "n", "args")  # the parser's per-row attributes (models/parse.py)
# Inputs our kernels take; others run PyTorch's layers. At batch 1 ours took 0.23-0.86x PyTorch's time on
# every depthwise conv and SE of MobileNetV3-Small-YOLO at 320 and 640 (inputs up to 1.8 M values). At
# batches of 4-32 oneDNN was faster on many layers (benchmarks/infer_kernels.py --batch N), and val.py's
# batch 32 ran 16.6 ms/image with PyTorch's layers and 22.6 with ours.
MAX_BATCH, MAX_VALUES = 1, 1 << 21


def _fn(name: str):  # noqa: ANN202 - a ctypes function, or None without the library
    lib = native.load("infer")
    return None if lib is None else getattr(lib, name)


def _takes(call: object, x: torch.Tensor) -> bool:
    """Whether our kernel runs for `x`: library loaded, float32 CPU 4-D, no gradient wanted (the kernels
    have no backward), and within MAX_BATCH / MAX_VALUES."""
    return (call is not None and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
            and not x.requires_grad and x.shape[0] <= MAX_BATCH and x.numel() <= MAX_VALUES)


class DepthwiseConvAct(nn.Module):
    """`act(conv(x))` for a biased depthwise conv (groups = in = out channels, square kernel and
    stride, dilation 1, equal zero padding). x [B, C, H, W] -> [B, C, Ho, Wo], channels_last.

    Keeps `conv` and `act`; inputs the kernel does not take (`_takes`: batches above MAX_BATCH, among
    others) run through them.
    The kernel's weights are CPU copies, so moving the module does not move them (nor is it needed).
    """

    def __init__(self, conv: nn.Conv2d, act: nn.Module) -> None:
        super().__init__()
        if not eligible_depthwise(conv, act):
            raise ValueError(f"not a depthwise conv our kernel runs: {conv}, {type(act).__name__}")
        self.conv, self.act = conv, act
        c, k = conv.out_channels, conv.kernel_size[0]
        self.k, self.s, self.pad, self.code = k, conv.stride[0], conv.padding[0], ACT_CODES[type(act)]
        w = conv.weight.detach().cpu()
        self.taps = w.reshape(c, k * k).t().contiguous()  # [k * k, C]: channels innermost
        self.b = conv.bias.detach().cpu().contiguous()
        self._plans: dict[torch.Size, tuple] = {}  # input shape -> (output shape, C arguments)
        self._call = _fn("dw_conv_act")

    def _plan(self, shape: torch.Size) -> tuple:
        n, c, h, w = shape
        ho, wo = (h + 2 * self.pad - self.k) // self.s + 1, (w + 2 * self.pad - self.k) // self.s + 1
        if c != self.conv.in_channels or ho < 1 or wo < 1:
            raise ValueError(f"depthwise conv of {c} channels cannot take input {list(shape)}")
        plan = self._plans[shape] = ((n, c, ho, wo), (n, h, w, c, ho, wo, self.k, self.s, self.pad, self.code))
        return plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _takes(self._call, x):
            return self.act(self.conv(x))
        if not x.is_contiguous(memory_format=CL):
            x = x.contiguous(memory_format=CL)
        out, args = self._plans.get(x.shape) or self._plan(x.shape)
        y = torch.empty(out, memory_format=CL)
        self._call(x.data_ptr(), self.taps.data_ptr(), self.b.data_ptr(), y.data_ptr(), *args, torch.get_num_threads())
        return y

    def extra_repr(self) -> str:
        return f"k={self.k}, stride={self.s}, act={type(self.act).__name__}"


def eligible_depthwise(conv: nn.Module, act: nn.Module) -> bool:
    """Whether `DepthwiseConvAct` computes `act(conv(x))` exactly for this conv and activation."""
    return (isinstance(conv, nn.Conv2d) and type(act) in ACT_CODES and conv.bias is not None
            and conv.groups == conv.in_channels == conv.out_channels and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str) and len(set(conv.kernel_size)) == 1
            and len(set(conv.stride)) == 1 and len(set(conv.padding)) == 1 and conv.dilation == (1, 1)
            and conv.weight.dtype == torch.float32)


class SqueezeExciteNative(nn.Module):
    """`SELayer` forward (x * hardsigmoid(fc2(relu(fc1(mean_hw(x)))))) in one call; x [B, C, H, W] -> same
    shape, channels_last. Keeps the original layer `se` for inputs the kernel does not take (as above)."""

    def __init__(self, se: nn.Module) -> None:
        super().__init__()
        self.se = se
        c, s = se.fc1.in_channels, se.fc1.out_channels
        self.c, self.s = c, s
        self.w1t = se.fc1.weight.detach().cpu().reshape(s, c).t().contiguous()  # [C, S]
        self.w2t = se.fc2.weight.detach().cpu().reshape(c, s).t().contiguous()  # [S, C]
        self.b1, self.b2 = se.fc1.bias.detach().cpu().contiguous(), se.fc2.bias.detach().cpu().contiguous()
        self._call = _fn("se_forward")
        for a in ROW_ATTRS:  # a YAML row of its own keeps its place in the graph
            if hasattr(se, a):
                setattr(self, a, getattr(se, a))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _takes(self._call, x) or x.shape[1] != self.c:
            return self.se(x)
        if not x.is_contiguous(memory_format=CL):
            x = x.contiguous(memory_format=CL)
        n, c, h, w = x.shape
        y = torch.empty_like(x, memory_format=CL)
        self._call(x.data_ptr(), y.data_ptr(), n, h * w, c, self.s, self.w1t.data_ptr(), self.b1.data_ptr(),
                   self.w2t.data_ptr(), self.b2.data_ptr(), torch.get_num_threads())
        return y


@torch.no_grad()
def swap_native(model: nn.Module, example: torch.Tensor) -> int:
    """Swap `model`'s depthwise `ConvBNAct`s (BN folded) and `SELayer`s for the C-kernel modules above;
    returns how many. The result is checked against the eager output on `example` ([B, 3, H, W]); on
    any mismatch or error everything is restored and 0 returned. Needs an eval, float32, CPU model.
    Nothing is swapped for an example batch above MAX_BATCH: the kernels would not run for such inputs,
    and the layers are then left to `pack_convs`.
    """
    from models.common import ConvBNAct
    from models.mobilenetv3 import SELayer

    if native.load("infer") is None or example.shape[0] > MAX_BATCH or example.device.type != "cpu" or any(
            p.dtype != torch.float32 or p.device.type != "cpu" for p in model.parameters()):
        return 0
    undo: list[tuple[nn.Module, str, nn.Module]] = []  # (parent, attribute, original)

    def swap() -> None:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, SELayer):
                    undo.append((parent, name, child))
                    setattr(parent, name, SqueezeExciteNative(child))
                elif (isinstance(child, ConvBNAct) and isinstance(child.bn, nn.Identity)
                      and eligible_depthwise(child.conv, child.act)):
                    undo.extend([(child, "conv", child.conv), (child, "act", child.act)])
                    child.conv, child.act = DepthwiseConvAct(child.conv, child.act), nn.Identity()

    ok = checked_swap(model, example, model(example), swap, "CPU inference kernels")
    if not ok:
        for parent, name, orig in reversed(undo):
            setattr(parent, name, orig)
        return 0
    return sum(isinstance(m, (DepthwiseConvAct, SqueezeExciteNative)) for m in model.modules())

