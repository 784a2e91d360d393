"""CPU inference: each fused conv and its activation as one oneDNN call on pre-reordered weights.

In eager PyTorch a BN-fused `ConvBNAct` is two kernels (oneDNN conv, then the activation as a second
pass over the output), and oneDNN reorders the weights into its blocked layout on every call. For
batch-1 detection those per-call costs are a large part of a small model's time. `pack_convs`
swaps each fused conv for `PackedConvAct`, which calls PyTorch's own oneDNN conv-with-post-op kernel
(`torch.ops.mkldnn._convolution_pointwise`, the kernel torch.compile's CPU backend emits) on weights
reordered once. Measured on the 2-core machine (batch 1, 320, 2 threads, three interleaved A/B runs):
8-9% less latency for MobileNetV3-Small-YOLO, 11-15% for yolov5n. Small gains less because its time
is mostly per-op overhead, not conv arithmetic (README, Benchmarks).

1x1 convs (stride 1, one group) on small maps are cheaper still as one matrix product: their NHWC
input is already a `[B*H*W, C]` matrix, and `torch.addmm` (plus the activation in place) skips
oneDNN's per-call setup. `MatmulConvAct` takes those with up to `MATMUL_MAX_ROWS` rows when packed
for batch 1: on the same machine (2 threads) the product took 0.66-0.81x the packed conv's time at
10x10 to 40x40 maps in MobileNetV3-Small-YOLO and 0.75-0.80x in yolov5n, 0.85-1.09x at 80x80 and
1.2-1.7x at 160x160; at batches of 2 to 32 with up to 3,200 rows it was 0.94-1.18x, so batches keep
the packed conv.

These ops are internal to PyTorch, so everything here degrades to the plain eager path: if they are
missing, fail on a probe, or the model is not a float32 CPU model, nothing is swapped.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

LOGGER = logging.getLogger("mobileyolo.backend")
# activation module -> oneDNN post-op name
POST_OPS: dict[type[nn.Module], str] = {nn.Identity: "none", nn.ReLU: "relu", nn.Hardswish: "hardswish",
                                        nn.SiLU: "swish"}
# activation module -> the same activation applied in place (MatmulConvAct's output is its own)
IN_PLACE = {nn.Identity: lambda y: y, nn.ReLU: torch.relu_, nn.Hardswish: lambda y: F.hardswish(y, inplace=True),
            nn.SiLU: lambda y: F.silu(y, inplace=True)}
MATMUL_MAX_ROWS = 4096  # H * W up to which a 1x1 conv runs as a matrix product, at batch 1 (module docstring)


class PackedConvAct(nn.Module):
    """`act(conv(x))` for a biased conv in one call; weights reordered for `input_size` ([B, C, H, W]).

    Inputs of another size still run correctly (oneDNN reorders again as needed). Inference only:
    the packed weight is not a parameter and carries no gradient.
    """

    def __init__(self, conv: nn.Conv2d, post_op: str, input_size: list[int]) -> None:
        super().__init__()
        if conv.bias is None or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("PackedConvAct needs a biased, zero-padded conv with numeric padding")
        self.padding, self.stride = list(conv.padding), list(conv.stride)
        self.dilation, self.groups, self.post_op = list(conv.dilation), conv.groups, post_op
        w = conv.weight.detach()
        self.weight = torch.ops.mkldnn._reorder_convolution_weight(w, self.padding, self.stride, self.dilation,
                                                                   self.groups, list(input_size))
        self.bias = conv.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._convolution_pointwise(x, self.weight, self.bias, self.padding, self.stride,
                                                       self.dilation, self.groups, self.post_op, [], "")

    def extra_repr(self) -> str:
        return f"stride={self.stride}, groups={self.groups}, post_op={self.post_op}"


class MatmulConvAct(nn.Module):
    """`act(conv(x))` for a biased 1x1 conv (stride 1, one group, no padding) as one `torch.addmm` on
    the NHWC rows of x [B, C, H, W] -> [B, c2, H, W] (channels_last). Inference only."""

    def __init__(self, conv: nn.Conv2d, act: nn.Module) -> None:
        super().__init__()
        if not matmul_eligible(conv, act):
            raise ValueError(f"MatmulConvAct needs a biased 1x1 conv, stride 1, one group, no padding: {conv}")
        self.wt = conv.weight.detach().reshape(conv.out_channels, conv.in_channels).t()  # [C, c2] view
        self.bias = conv.bias.detach()
        self.act_name = type(act).__name__
        self._act = IN_PLACE[type(act)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if not x.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        y = self._act(torch.addmm(self.bias, x.permute(0, 2, 3, 1).reshape(n * h * w, c), self.wt))
        return y.view(n, h, w, -1).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return f"{self.wt.shape[0]} -> {self.wt.shape[1]}, act={self.act_name}"


def matmul_eligible(conv: nn.Module, act: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.groups == 1 and conv.padding in ((0, 0), 0) and conv.bias is not None
            and type(act) in IN_PLACE)


def available() -> bool:
    """Whether this PyTorch build has the oneDNN ops `PackedConvAct` calls."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_convolution_weight"))


@torch.no_grad()
def pack_convs(model: nn.Module, example: torch.Tensor) -> int:
    """Swap the convs of `model` (eval, BN folded, CPU, float32) for `PackedConvAct`; returns how many.

    Each BN-fused `ConvBNAct` becomes one packed conv with its activation as the post-op, or a
    `MatmulConvAct` for a 1x1 conv whose example input is one image of at most `MATMUL_MAX_ROWS`
    pixels; one whose activation has no oneDNN post-op keeps the eager path, and so do plain convs
    (squeeze-excite's 1x1s on 1x1 maps, Detect's heads): packing those too made MobileNetV3-Small ~5% slower here.
    `example` ([B, 3, H, W]) is run once to learn each conv's input size. The result is checked
    against the eager output on `example`; on any mismatch or error the model is restored and 0
    returned.
    """
    from models.common import ConvBNAct

    if not available() or example.device.type != "cpu" or any(
            p.dtype != torch.float32 or p.device.type != "cpu" for p in model.parameters()):
        return 0
    swaps = [m for m in model.modules() if isinstance(m, ConvBNAct) and isinstance(m.bn, nn.Identity)
             and type(m.act) in POST_OPS and isinstance(m.conv, nn.Conv2d) and m.conv.bias is not None
             and m.conv.padding_mode == "zeros" and not isinstance(m.conv.padding, str)]
    sizes: dict[nn.Module, list[int]] = {}

    def record(mod: nn.Module, inp: tuple) -> None:  # a pre-hook that returned a value would replace the input
        sizes.setdefault(mod, list(inp[0].shape))

    hooks = [m.conv.register_forward_pre_hook(record) for m in swaps]
    try:
        ref = model(example)
    finally:
        for h in hooks:
            h.remove()
    saved = [(m, m.conv, m.act) for m in swaps if m.conv in sizes]  # convs the example never reached stay

    def swap() -> None:
        for m, conv, act in saved:
            n, _, h, w = sizes[conv]
            if matmul_eligible(conv, act) and n == 1 and h * w <= MATMUL_MAX_ROWS:
                m.conv = MatmulConvAct(conv, act)
            else:
                m.conv = PackedConvAct(conv, POST_OPS[type(act)], sizes[conv])
            m.act = nn.Identity()

    ok = checked_swap(model, example, ref, swap, "oneDNN packed convs")
    if not ok:
        for m, conv, act in saved:
            m.conv, m.act = conv, act
        return 0
    return len(saved)


def checked_swap(model: nn.Module, example: torch.Tensor, ref: object, swap: Callable[[], None], what: str) -> bool:
    """Run `swap()` (which replaces some of `model`'s layers), then `model(example)`; True when the output
    matches `ref` (the eager output). False, with a warning naming `what`, on a mismatch or an error:
    the caller then restores the layers."""
    try:
        swap()
        ok = same_outputs(ref, model(example))
    except (RuntimeError, ValueError) as e:
        LOGGER.warning(f"{what} failed ({type(e).__name__}: {e}); using the eager path")
        return False
    if not ok:
        LOGGER.warning(f"{what} disagree with the eager model; using the eager path")
    return ok


def same_outputs(ref: torch.Tensor | list | tuple, out: torch.Tensor | list | tuple, tol: float = 1e-4) -> bool:
    """Whether two model outputs (tensors or nested lists of them) agree to `tol` (relative and absolute)."""
    a, b = _flat(ref), _flat(out)
    return len(a) == len(b) and all(x.shape == y.shape and torch.allclose(x, y, rtol=tol, atol=tol)
                                    for x, y in zip(a, b))


def _flat(out: torch.Tensor | list | tuple) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else [t for o in out for t in _flat(o)]
