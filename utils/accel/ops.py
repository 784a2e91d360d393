"""The CPU training kernels (cpu_train_kernels.c) as PyTorch custom ops, namespace `mobileyolo`.

`register()` defines them, once per process (thread-safe; nothing happens at import). Afterwards they
are `torch.ops.mobileyolo.<name>`: the dispatcher, the profiler (each call is a `mobileyolo::<name>`
event) and autograd see them as ops. Tensors are NCHW-shaped, float32, on the CPU; "NHWC" below means
`is_contiguous(memory_format=torch.channels_last)`, which is the memory the C code walks.

Kernel ops, one C call each:
    bn_act_backward(x NHWC, grad_y NHWC, weight [C], bias [C], stats [3, C], act, input_grad)
        -> (grad_x NHWC, or an empty tensor when not input_grad; grad_weight [C]; grad_bias [C])
    dw_weight_grad(x NHWC [N, C, H, W], grad_out NHWC [N, C, Ho, Wo], kernel, stride, padding)
        -> grad_weight [C, 1, k, k] of a depthwise conv (zero padding, dilation 1)
    se_gate_grad(x NHWC, grad_y NHWC same shape) -> [N, C]: sum over H, W of grad_y * x
    se_input_grad(grad_y NHWC, gate [N, C], grad_pool [N, C]) -> grad_y * gate + grad_pool, NHWC
Differentiable ops (backward registered with `torch.library.register_autograd`):
    bn_act_forward(x NHWC, weight, bias, running_mean, running_var, momentum, eps, act)
        -> (y NHWC, stats [3, C] = batch mean, biased var, invstd; new running_mean; new running_var)
        y = act(BatchNorm(x)) with batch statistics. Functional: the running statistics come back as
        new tensors (BatchNorm2d's update, unbiased variance) for the caller to copy into its buffers,
        because PyTorch registers no autograd formula for an op that mutates its inputs.
    dw_conv2d(x NHWC, weight [C, 1, k, k], stride, padding) -> F.conv2d(x, weight, None, stride,
        padding, groups=C); its weight gradient is `dw_weight_grad`, its input gradient aten's.
    se_forward(x NHWC, w1 [S, C, 1, 1], b1 [S], w2 [C, S, 1, 1], b2 [C]) -> (y, pooled [N, C], gate [N, C]):
        SELayer, y = x * hardsigmoid(w2 relu(w1 mean_hw(x) + b1) + b2); backward in two passes over x.
`act`: 0 identity, 1 ReLU, 2 hard-swish (`ACT_CODES` in utils/accel/train_kernels.py).

Every op checks its inputs in Python before the C call: dtype float32, device CPU, strided layout,
rank and shapes that agree, the memory layout above, `act` and the geometry in range. A violation
raises ValueError naming the op and the argument; nothing reaches C that would read past a buffer.
Fake (meta) implementations make the same checks and give the output shapes without running C.
Kernels are registered for the CPU only: for other backends (CUDA, sparse) the dispatcher itself
raises NotImplementedError; mixed devices reach the fake and are refused there.
"""
from __future__ import annotations

import ctypes
import threading

import torch
import torch.nn.functional as F
from torch import Tensor

from utils.accel import native

NS = "mobileyolo"
CL = torch.channels_last
# the C code keeps per-channel arrays on the stack: at this cap up to 256 KiB on the calling thread and
# 96 KiB on each OpenMP thread, well inside default thread stacks; detection models use a few thousand at most
MAX_CHANNELS = 8192
_MAX_ELEMS = 2 ** (8 * ctypes.sizeof(ctypes.c_long) - 1) - 1  # C indexes with `long`
_LOCK = threading.Lock()
_REGISTERED: list[bool] = []  # non-empty once register() has run in this process


def _err(op: str, msg: str) -> ValueError:
    return ValueError(f"{NS}::{op}: {msg}")


def _check(op: str, name: str, t: object, dim: int, nhwc: bool = False) -> None:
    """`t` is a strided float32 CPU-or-meta tensor of rank `dim`, contiguous (NHWC when `nhwc`)."""
    if not isinstance(t, Tensor):
        raise _err(op, f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise _err(op, f"{name} must be float32, got {t.dtype}")
    if t.layout != torch.strided:
        raise _err(op, f"{name} must be a dense (strided) tensor, got {t.layout}")
    if t.device.type not in ("cpu", "meta"):
        raise _err(op, f"{name} must be on the CPU, got {t.device}")
    if t.dim() != dim:
        raise _err(op, f"{name} must have {dim} dimensions, got shape {list(t.shape)}")
    if t.numel() > _MAX_ELEMS:
        raise _err(op, f"{name} has {t.numel()} elements, more than the C code can index")
    if nhwc and not t.is_contiguous(memory_format=CL):
        raise _err(op, f"{name} must be channels_last contiguous (NHWC memory), got strides {t.stride()}")
    if not nhwc and not t.is_contiguous():
        raise _err(op, f"{name} must be contiguous, got strides {t.stride()}")


def _same_device(op: str, **tensors: Tensor) -> None:
    devices = {str(t.device) for t in tensors.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {t.device}" for k, t in tensors.items())
        raise _err(op, f"all tensors must be on one device, got {where}")


def _shape(op: str, name: str, t: Tensor, want: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(want):
        raise _err(op, f"{name} must have shape {list(want)}, got {list(t.shape)}")


def _channels(op: str, x: Tensor, min_rows: int = 1, name: str = "x") -> tuple[int, int, int, int]:
    n, c, h, w = x.shape
    if not 1 <= c <= MAX_CHANNELS:
        raise _err(op, f"{name} must have 1 to {MAX_CHANNELS} channels, got {c}")
    if n * h * w < min_rows:
        raise _err(op, f"{name} must have at least {min_rows} values per channel (N*H*W), got {n * h * w}")
    return n, c, h, w


def _act(op: str, act: int) -> None:
    if act not in (0, 1, 2):
        raise _err(op, f"act must be 0 (identity), 1 (ReLU) or 2 (hard-swish), got {act}")


def _lib():  # noqa: ANN202 - the ctypes library
    lib = native.load()
    if lib is None:
        raise RuntimeError(f"{NS} ops: the CPU training kernels library is unavailable: "
                           f"{native.unavailable_reason()}")
    return lib


def _nhwc(t: Tensor) -> Tensor:
    """`t` with NHWC memory (a copy only when it is not already laid out so)."""
    return t if t.is_contiguous(memory_format=CL) else t.contiguous(memory_format=CL)


def _new(like: Tensor, shape: tuple[int, ...], nhwc: bool = False) -> Tensor:
    fmt = CL if nhwc else torch.contiguous_format
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt)


# ---- checks shared by the real (CPU) and fake (meta) implementations: each `check_<op>` takes the op's
# arguments, raises ValueError for anything its C code cannot take, and returns (N, C, H, W) of its
# first tensor (dw_conv2d: of its output)

def check_bn_act_forward(x, weight, bias, running_mean, running_var, momentum, eps, act):  # noqa: ANN001, ANN201
    op = "bn_act_forward"
    _check(op, "x", x, 4, nhwc=True)
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        _check(op, name, t, 1)
    _same_device(op, x=x, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    n, c, h, w = _channels(op, x, min_rows=2)  # BatchNorm's own rule: more than one value per channel
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        _shape(op, name, t, (c,))
    _act(op, act)
    if not (0.0 <= momentum <= 1.0 and eps >= 0.0):
        raise _err(op, f"momentum must be in [0, 1] and eps >= 0, got momentum={momentum}, eps={eps}")
    return n, c, h, w


def check_bn_act_backward(x, grad_y, weight, bias, stats, act):  # noqa: ANN001, ANN201
    op = "bn_act_backward"
    _check(op, "x", x, 4, nhwc=True)
    _check(op, "grad_y", grad_y, 4, nhwc=True)
    for name, t, d in (("weight", weight, 1), ("bias", bias, 1), ("stats", stats, 2)):
        _check(op, name, t, d)
    _same_device(op, x=x, grad_y=grad_y, weight=weight, bias=bias, stats=stats)
    n, c, h, w = _channels(op, x)
    _shape(op, "grad_y", grad_y, tuple(x.shape))
    _shape(op, "weight", weight, (c,))
    _shape(op, "bias", bias, (c,))
    _shape(op, "stats", stats, (3, c))
    _act(op, act)
    return n, c, h, w


def check_dw_weight_grad(x, grad_out, kernel, stride, padding):  # noqa: ANN001, ANN201
    op = "dw_weight_grad"
    _check(op, "x", x, 4, nhwc=True)
    _check(op, "grad_out", grad_out, 4, nhwc=True)
    _same_device(op, x=x, grad_out=grad_out)
    n, c, h, w = _channels(op, x)
    if kernel < 1 or stride < 1 or padding < 0:
        raise _err(op, f"need kernel >= 1, stride >= 1, padding >= 0, got {kernel}, {stride}, {padding}")
    ho, wo = (h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1
    if ho < 1 or wo < 1:
        raise _err(op, f"a {kernel}x{kernel} kernel with padding {padding} does not fit x of shape {list(x.shape)}")
    _shape(op, "grad_out", grad_out, (n, c, ho, wo))
    return n, c, h, w


def check_dw_conv2d(x, weight, stride, padding):  # noqa: ANN001, ANN201
    op = "dw_conv2d"
    _check(op, "x", x, 4, nhwc=True)
    _check(op, "weight", weight, 4)
    _same_device(op, x=x, weight=weight)
    n, c, h, w = _channels(op, x)
    k = weight.shape[-1]
    _shape(op, "weight", weight, (c, 1, k, k))
    if k < 1 or stride < 1 or padding < 0 or h + 2 * padding < k or w + 2 * padding < k:
        raise _err(op, f"kernel {k}, stride {stride}, padding {padding} do not fit x of shape {list(x.shape)}")
    return n, c, (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1


def check_se_gate_grad(x, grad_y):  # noqa: ANN001, ANN201
    op = "se_gate_grad"
    _check(op, "x", x, 4, nhwc=True)
    _check(op, "grad_y", grad_y, 4, nhwc=True)
    _same_device(op, x=x, grad_y=grad_y)
    _shape(op, "grad_y", grad_y, tuple(x.shape))
    return _channels(op, x)


def check_se_input_grad(grad_y, gate, grad_pool):  # noqa: ANN001, ANN201
    op = "se_input_grad"
    _check(op, "grad_y", grad_y, 4, nhwc=True)
    _check(op, "gate", gate, 2)
    _check(op, "grad_pool", grad_pool, 2)
    _same_device(op, grad_y=grad_y, gate=gate, grad_pool=grad_pool)
    n, c, h, w = _channels(op, grad_y, name="grad_y")
    _shape(op, "gate", gate, (n, c))
    _shape(op, "grad_pool", grad_pool, (n, c))
    return n, c, h, w


def check_se_forward(x, w1, b1, w2, b2):  # noqa: ANN001, ANN201
    op = "se_forward"
    _check(op, "x", x, 4, nhwc=True)
    for name, t, d in (("w1", w1, 4), ("b1", b1, 1), ("w2", w2, 4), ("b2", b2, 1)):
        _check(op, name, t, d)
    _same_device(op, x=x, w1=w1, b1=b1, w2=w2, b2=b2)
    n, c, h, w = _channels(op, x)
    s = w1.shape[0]
    for name, t, want in (("w1", w1, (s, c, 1, 1)), ("b1", b1, (s,)), ("w2", w2, (c, s, 1, 1)), ("b2", b2, (c,))):
        _shape(op, name, t, want)
    return n, c, h, w


def register() -> None:
    """Define the `mobileyolo::` ops in this process; later calls (from any thread) do nothing."""
    if _REGISTERED:
        return
    with _LOCK:
        if _REGISTERED:
            return
        from utils.accel import op_impls  # the definitions; imported here, so that nothing registers at import

        op_impls.define_all()
        _REGISTERED.append(True)


def is_registered() -> bool:
    """Whether `register()` has run in this process."""
    return bool(_REGISTERED)


def se_gate(pooled: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """[N, C] -> [N, C]: SELayer's gate on the pooled input (the 1x1 convs as matrix products)."""
    h = F.relu(F.linear(pooled, w1.flatten(1), b1))
    return F.hardsigmoid(F.linear(h, w2.flatten(1), b2))


def se_gate_backward(g_gate: Tensor, pooled: Tensor, w1: Tensor, b1: Tensor, w2: Tensor,
                     b2: Tensor) -> tuple[Tensor, ...]:
    """Gradients of `se_gate` for (pooled, w1, b1, w2, b2) given g_gate [N, C], as autograd's, by hand.

    By hand because a nested `torch.autograd.grad` over this [N, C]-sized MLP cost more than the
    layer's own work on small maps. The two linears are re-run for their inputs.
    """
    w1m, w2m = w1.flatten(1), w2.flatten(1)
    h = F.linear(pooled, w1m, b1).clamp_min_(0)
    a2 = F.linear(h, w2m, b2)
    g_a2 = g_gate * ((a2 > -3) & (a2 < 3)) / 6  # hardsigmoid's slope, zero at and beyond +-3 as in torch
    g_h = (g_a2 @ w2m) * (h > 0)
    return (g_h @ w1m, (g_h.t() @ pooled).view_as(w1), g_h.sum(0), (g_a2.t() @ h).view_as(w2), g_a2.sum(0))
