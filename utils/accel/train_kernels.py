"""Training-time CPU fast path for `ConvBNAct` and `SELayer`: C kernels where PyTorch's are slow for them.

`conv_bn_act(module, x)` computes `module.act(module.bn(module.conv(x)))` in train mode with the same
results as PyTorch (to float32 rounding; running statistics updated the same way), but:

- a depthwise conv's weight gradient (kernel 5x5 and up) comes from our kernel, not oneDNN's generic
  grouped-conv path (its forward and input gradient stay oneDNN's);
- BatchNorm (batch statistics) and the activation are one op: two passes over the tensor forward and
  two backward, where PyTorch makes five and eight, and only the conv output is saved for backward;
- `squeeze_excite` (SELayer): the backward is two passes over the input instead of six.

It applies only where it is exact: CPU, float32, grad enabled, channels_last conv output, a plain
`nn.BatchNorm2d` (affine, running stats, a momentum), an activation in `ACT_CODES` (else only the
depthwise weight gradient is ours), not inside torch.compile / tracing, and the kernels library built
(`utils.accel.native`). Otherwise these functions return None and the module runs its own layers as usual.
`MOBILEYOLO_CPU_KERNELS=0` turns it off. Measured: benchmarks/train_kernels.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from utils.accel import native

# activations fused into the BatchNorm kernel. With any other (SiLU: YOLOv5's Conv) BatchNorm and the
# activation stay PyTorch's: a C SiLU measured slower than PyTorch's vectorized one, and our BatchNorm
# followed by PyTorch's SiLU trained yolov5n no faster (1.00-1.03x the step time, four interleaved A/Bs).
ACT_CODES: dict[type[nn.Module], int] = {nn.Identity: 0, nn.ReLU: 1, nn.Hardswish: 2}
CL = torch.channels_last
# our depthwise weight gradient is used from this kernel size up: 5x5 took 0.23-0.36x oneDNN's time on
# MobileNetV3-Small's shapes, 3x3 0.4-1.7x (mostly slower; benchmarks/train_kernels.py, 2 threads)
DW_MIN_K = 5


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    """`t` with NHWC memory (a copy only when it is not already laid out so)."""
    return t if t.is_contiguous(memory_format=CL) else t.contiguous(memory_format=CL)


class _BNActFn(torch.autograd.Function):
    """y = act((x - mean) / sqrt(var + eps) * w + b) with batch statistics.

    `running` = (running_mean, running_var, momentum): BatchNorm2d's running statistics, updated in the
    same C call. The wrapper stays thin because at small batches its Python cost per call (~70 us
    forward before, against ~9 us in C on a [2, 16, 8, 8] map) was several times the kernel's.
    """

    @staticmethod
    def forward(ctx, x, w, b, eps: float, act: int, lib, running):
        n, c, h, wd = x.shape
        y = torch.empty_like(x, memory_format=CL)
        stats = x.new_empty(3, c)  # mean, biased var, invstd
        rm, rv, momentum = running
        if lib.bn_act_forward(_ptr(x), _ptr(y), n * h * wd, c, _ptr(w), _ptr(b), eps, act, _ptr(stats),
                              _ptr(rm), _ptr(rv), momentum, torch.get_num_threads()):
            raise MemoryError("bn_act_forward: out of memory for its scratch")
        ctx.save_for_backward(x, w, b, stats)
        ctx.act, ctx.lib = act, lib
        return y

    @staticmethod
    def backward(ctx, gy):
        x, w, b, stats = ctx.saved_tensors
        n, c, h, wd = x.shape
        gy = _nhwc(gy)
        gx = torch.empty_like(x, memory_format=CL) if ctx.needs_input_grad[0] else None
        gw, gb = torch.empty_like(w), torch.empty_like(b)
        if ctx.lib.bn_act_backward(_ptr(x), _ptr(gy), _ptr(gx) if gx is not None else None, n * h * wd, c,
                                   _ptr(w), _ptr(b), _ptr(stats[0]), _ptr(stats[2]), ctx.act, _ptr(gw), _ptr(gb),
                                   torch.get_num_threads()):
            raise MemoryError("bn_act_backward: out of memory for its scratch")
        return gx, gw, gb, None, None, None, None


class _DepthwiseConvFn(torch.autograd.Function):
    """F.conv2d(x, w, None, s, p, groups=C) with our weight gradient (square kernel, dilation 1)."""

    @staticmethod
    def forward(ctx, x, w, s: int, p: int, lib):
        ctx.save_for_backward(x, w)
        ctx.s, ctx.p, ctx.lib = s, p, lib
        return F.conv2d(x, w, None, s, p, 1, x.shape[1])

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        s, p, k, c = ctx.s, ctx.p, w.shape[-1], x.shape[1]
        g = _nhwc(g)
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.aten.convolution_backward(g, x, w, None, [s, s], [p, p], [1, 1], False, [0, 0], c,
                                                     [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            nt = torch.get_num_threads()
            gw = torch.empty_like(w)
            scratch = torch.empty(nt * k * k * c)
            n, _, h, wd = x.shape
            ctx.lib.dw_weight_grad(_ptr(x), _ptr(g), _ptr(gw), n, c, h, wd, g.shape[2], g.shape[3], k, s, p,
                                   _ptr(scratch), nt)
        return gx, gw, None, None, None


def _plain_depthwise(conv: nn.Conv2d) -> bool:
    k, s, p, d = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    return (conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels and conv.bias is None
            and k[0] == k[1] and s[0] == s[1] and not isinstance(p, str) and p[0] == p[1] and d == (1, 1)
            and conv.padding_mode == "zeros")


def _bn_ok(bn: nn.Module) -> bool:
    # the C kernel reads weight, bias and the running buffers as plain float32 arrays
    return (type(bn) is nn.BatchNorm2d and bn.affine and bn.track_running_stats and bn.momentum is not None
            and bn.running_mean is not None
            and all(t.dtype == torch.float32 and t.is_contiguous()
                    for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)))


def _se_gate(pooled, w1, b1, w2, b2):  # noqa: ANN001, ANN202 - [B, C] -> [B, C], SELayer's formula
    h = F.relu(F.linear(pooled, w1.flatten(1), b1))
    return F.hardsigmoid(F.linear(h, w2.flatten(1), b2))


def _se_gate_backward(g_gate, pooled, w1, b1, w2, b2):  # noqa: ANN001, ANN202
    """Gradients of `_se_gate` for (pooled, w1, b1, w2, b2) given g_gate [B, C], as autograd's, by hand.

    By hand because a nested `torch.autograd.grad` over this [B, C]-sized MLP cost ~0.4 ms per SE
    layer, more than the layer's own work on small maps. The two linears are re-run for their inputs.
    """
    w1m, w2m = w1.flatten(1), w2.flatten(1)
    h = F.linear(pooled, w1m, b1).clamp_min_(0)
    a2 = F.linear(h, w2m, b2)
    g_a2 = g_gate * ((a2 > -3) & (a2 < 3)) / 6  # hardsigmoid's slope, zero at and beyond +-3 as in torch
    g_h = (g_a2 @ w2m) * (h > 0)
    return (g_h @ w1m, (g_h.t() @ pooled).view_as(w1), g_h.sum(0), (g_a2.t() @ h).view_as(w2), g_a2.sum(0))


class _SEFn(torch.autograd.Function):
    """x * gate(mean over H, W of x)[:, :, None, None]; backward in two passes over x instead of six."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, lib):  # noqa: ANN001
        pooled = x.mean((2, 3))
        gate = _se_gate(pooled, w1, b1, w2, b2)
        ctx.save_for_backward(x, pooled, gate, w1, b1, w2, b2)
        ctx.lib = lib
        return x * gate[:, :, None, None]

    @staticmethod
    def backward(ctx, gy):  # noqa: ANN001
        x, pooled, gate, *ws = ctx.saved_tensors
        n, c, h, w = x.shape
        gy, nt = _nhwc(gy), torch.get_num_threads()
        g_gate = x.new_empty(n, c)
        ctx.lib.se_gate_grad(_ptr(x), _ptr(gy), _ptr(g_gate), n, h * w, c, nt)
        grads = _se_gate_backward(g_gate, pooled, *ws)
        g_pool = (grads[0] / (h * w)).contiguous()
        gx = torch.empty_like(x, memory_format=CL)
        ctx.lib.se_input_grad(_ptr(gy), _ptr(gate.contiguous()), _ptr(g_pool), _ptr(gx), n, h * w, c, nt)
        return (gx, *grads[1:], None)


def _eligible(module: nn.Module, x: torch.Tensor):  # noqa: ANN202 - the library, or None
    """The kernels library when `module(x)` can take the fast path (see the module docstring), else None."""
    if (not module.training or not torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype != torch.float32
            or x.dim() != 4 or torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling()
            or not x.is_contiguous(memory_format=CL)):
        return None
    return native.load()


def squeeze_excite(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """SELayer `module` (fc1, fc2 1x1 convs with bias) on x [N, C, H, W] on the fast path, or None."""
    lib = _eligible(module, x)
    if lib is None or module.fc1.bias is None or module.fc2.bias is None:
        return None
    return _SEFn.apply(x, module.fc1.weight, module.fc1.bias, module.fc2.weight, module.fc2.bias, lib)


def conv_bn_act(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """`module.act(module.bn(module.conv(x)))` on the fast path, or None where it does not apply.

    `module` has `conv` (nn.Conv2d), `bn` and `act`; x is [N, C1, H, W]. Returns [N, C2, H', W'] in
    channels_last memory and updates `bn`'s running statistics as PyTorch does.
    """
    bn, act = module.bn, module.act
    lib = _eligible(module, x) if _bn_ok(bn) else None
    if lib is None:
        return None
    conv = module.conv
    if _plain_depthwise(conv) and conv.kernel_size[0] >= DW_MIN_K and conv.weight.requires_grad:
        y = _DepthwiseConvFn.apply(x, conv.weight, conv.stride[0], conv.padding[0], lib)
    else:
        y = conv(x)
    if (type(act) not in ACT_CODES or not y.is_contiguous(memory_format=CL)
            or y.shape[0] * y.shape[2] * y.shape[3] < 2):
        return act(bn(y))  # odd layout, or one value per channel (BatchNorm's own error is the right one)
    out = _BNActFn.apply(y, bn.weight, bn.bias, float(bn.eps), ACT_CODES[type(act)], lib,
                         (bn.running_mean, bn.running_var, float(bn.momentum)))
    bn.num_batches_tracked.add_(1)
    return out
