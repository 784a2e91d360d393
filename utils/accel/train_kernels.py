"""Training-time CPU fast path for `ConvBNAct` and `SELayer`, on the `mobileyolo::` custom ops (ops.py).

`conv_bn_act(module, x)` computes `module.act(module.bn(module.conv(x)))` in train mode with the same
results as PyTorch (to float32 rounding; running statistics updated the same way), but:

- a depthwise conv's weight gradient (kernel `DW_MIN_K` and up) comes from our kernel
  (`mobileyolo::dw_conv2d`), not oneDNN's generic grouped-conv path (its forward and input gradient
  stay oneDNN's);
- BatchNorm (batch statistics) and the activation are one op (`mobileyolo::bn_act_forward`): two passes
  over the tensor forward and two backward, where PyTorch makes five and eight, and only the conv
  output is saved for backward;
- `squeeze_excite` (SELayer, `mobileyolo::se_forward`): the backward is two passes over the input
  instead of six.

It applies only where it is exact (`qualifies`): train mode, grad enabled, a CPU float32 4-D
channels_last input, not inside torch.compile / TorchScript / tracing, and the kernels library loaded
(`utils.accel.native`; `MOBILEYOLO_CPU_KERNELS=0` keeps it unloaded). ConvBNAct also needs a plain
`nn.BatchNorm2d` in train mode (affine, running stats, a momentum, float32 contiguous tensors); an activation
outside `ACT_CODES` keeps PyTorch's BatchNorm and activation (only the depthwise weight gradient is
ours). Where it does not apply these functions return None and the caller runs its plain forward.
Models never call them: `utils.accel.accelerate` swaps modules that do. Measured: benchmarks/train_kernels.py.
"""
from __future__ import annotations

import torch
from torch import nn

from utils.accel import native, ops

# activations fused into the BatchNorm kernel. With any other (SiLU: YOLOv5's Conv) BatchNorm and the
# activation stay PyTorch's: a C SiLU measured slower than PyTorch's vectorized one, and our BatchNorm
# followed by PyTorch's SiLU trained yolov5n no faster (four interleaved A/B runs).
ACT_CODES: dict[type[nn.Module], int] = {nn.Identity: 0, nn.ReLU: 1, nn.Hardswish: 2}
CL = torch.channels_last
# our depthwise weight gradient is used from this kernel size up: at 5x5 it took a fraction of oneDNN's
# time on MobileNetV3-Small's shapes, at 3x3 it was mostly slower (benchmarks/train_kernels.py)
DW_MIN_K = 5


def plain_depthwise(conv: nn.Conv2d) -> bool:
    """A depthwise conv our weight gradient computes: groups == C, no bias, square kernel, equal
    strides and paddings (numbers), dilation 1, zero padding."""
    k, s, p, d = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    return (type(conv) is nn.Conv2d and conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels
            and conv.bias is None and k[0] == k[1] and s[0] == s[1] and not isinstance(p, str) and p[0] == p[1]
            and d == (1, 1) and conv.padding_mode == "zeros")


def bn_ok(bn: nn.Module) -> bool:
    """`bn` is what the BatchNorm kernel computes: a plain affine BatchNorm2d with running statistics,
    its four tensors float32 and contiguous (the C code reads and updates them as plain arrays)."""
    return (type(bn) is nn.BatchNorm2d and bn.affine and bn.track_running_stats and bn.momentum is not None
            and bn.running_mean is not None and bn.num_features <= ops.MAX_CHANNELS
            and all(t.dtype == torch.float32 and t.is_contiguous()
                    for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)))


def convbnact_gains(module: nn.Module) -> bool:
    """Whether a ConvBNAct-like `module` (conv, bn, act) has a part the kernels compute: a fused
    activation, or a depthwise conv of kernel `DW_MIN_K` and up; and a BatchNorm they take."""
    conv = getattr(module, "conv", None)
    if not isinstance(conv, nn.Conv2d) or not bn_ok(getattr(module, "bn", None)):
        return False
    fused_act = type(getattr(module, "act", None)) in ACT_CODES
    return fused_act or (plain_depthwise(conv) and conv.kernel_size[0] >= DW_MIN_K)


def qualifies(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether `module(x)` may take the fast path (train mode, autograd on, non-empty CPU float32 NHWC 4-D input,
    not compiling / scripting / tracing, library loaded). Registers the ops on the first True."""
    if (not module.training or not torch.is_grad_enabled() or not isinstance(x, torch.Tensor)
            or x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 4 or x.layout != torch.strided
            or torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling()
            or not x.is_contiguous(memory_format=CL) or x.shape[1] > ops.MAX_CHANNELS or x.numel() == 0):
        return False
    if native.load() is None:
        return False
    ops.register()
    return True


def squeeze_excite(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """SELayer `module` (fc1, fc2: 1x1 convs with bias) on x [N, C, H, W] on the fast path, or None."""
    if module.fc1.bias is None or module.fc2.bias is None or not qualifies(module, x):
        return None
    params = (module.fc1.weight, module.fc1.bias, module.fc2.weight, module.fc2.bias)
    if any(t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() for t in params):
        return None
    return ops.grad_op("se_forward")(x, *params)


def conv_bn_act(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """`module.act(module.bn(module.conv(x)))` on the fast path, or None where it does not apply.

    `module` has `conv` (nn.Conv2d), `bn` and `act`; x is [N, C1, H, W]. Returns [N, C2, H', W'] in
    channels_last memory and updates `bn`'s running statistics and counter as PyTorch does.
    """
    bn, act, conv = module.bn, module.act, module.conv
    if not bn_ok(bn) or not bn.training or not qualifies(module, x):  # an eval BatchNorm keeps its statistics
        return None
    w = conv.weight
    if (plain_depthwise(conv) and conv.kernel_size[0] >= DW_MIN_K and w.requires_grad and w.dtype == torch.float32
            and w.is_contiguous()):
        y = ops.grad_op("dw_conv2d")(x, w, conv.stride[0], conv.padding[0])
    else:
        y = conv(x)
    if (type(act) not in ACT_CODES or not y.is_contiguous(memory_format=CL)
            or y.shape[0] * y.shape[2] * y.shape[3] < 2):
        return act(bn(y))  # odd layout, or one value per channel (BatchNorm's own error is the right one)
    out = ops.grad_op("bn_act_forward")(y, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                        float(bn.momentum), float(bn.eps), ACT_CODES[type(act)])
    bn.num_batches_tracked.add_(1)
    return out
