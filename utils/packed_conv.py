"""CPU inference: each fused conv and its activation as one oneDNN call on pre-reordered weights.

In eager PyTorch a BN-fused `ConvBNAct` is two kernels (oneDNN conv, then the activation as a second
pass over the output), and oneDNN reorders the weights into its blocked layout on every call. For
batch-1 detection those per-call costs are a large part of a small model's time. `pack_convs`
swaps each fused conv for `PackedConvAct`, which calls PyTorch's own oneDNN conv-with-post-op kernel
(`torch.ops.mkldnn._convolution_pointwise`, the kernel torch.compile's CPU backend emits) on weights
reordered once. Measured on the 2-core machine (batch 1, 320, 2 threads, three interleaved A/B runs):
8-9% less latency for MobileNetV3-Small-YOLO, 11-15% for yolov5n. Small gains less because its time
is mostly per-op overhead, not conv arithmetic (README, Benchmarks).

These ops are internal to PyTorch, so everything here degrades to the plain eager path: if they are
missing, fail on a probe, or the model is not a float32 CPU model, nothing is swapped.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

LOGGER = logging.getLogger("mobileyolo.backend")
# activation module -> oneDNN post-op name
POST_OPS: dict[type[nn.Module], str] = {nn.Identity: "none", nn.ReLU: "relu", nn.Hardswish: "hardswish",
                                        nn.SiLU: "swish"}


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


def available() -> bool:
    """Whether this PyTorch build has the oneDNN ops `PackedConvAct` calls."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_convolution_weight"))


@torch.no_grad()
def pack_convs(model: nn.Module, example: torch.Tensor) -> int:
    """Swap the convs of `model` (eval, BN folded, CPU, float32) for `PackedConvAct`; returns how many.

    Each BN-fused `ConvBNAct` becomes one packed conv with its activation as the post-op; one whose
    activation has no oneDNN post-op keeps the eager path, and so do plain convs (squeeze-excite's
    1x1s on 1x1 maps, Detect's heads): packing those too made MobileNetV3-Small ~5% slower here.
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
    try:
        for m, conv, act in saved:
            m.conv, m.act = PackedConvAct(conv, POST_OPS[type(act)], sizes[conv]), nn.Identity()
        out = model(example)
        ok = all(torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(_flat(ref), _flat(out)))
        if not ok:
            LOGGER.warning("oneDNN packed convs disagree with the eager model; using the eager path")
    except (RuntimeError, ValueError) as e:
        LOGGER.warning(f"oneDNN packed convs unavailable ({type(e).__name__}: {e}); using the eager path")
        ok = False
    if not ok:
        for m, conv, act in saved:
            m.conv, m.act = conv, act
        return 0
    return len(saved)


def _flat(out: torch.Tensor | list | tuple) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else [t for o in out for t in _flat(o)]
