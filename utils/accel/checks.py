"""Input checks of the `mobileyolo::` ops (contracts: utils/accel/ops.py), shared by their CPU and fake
implementations (utils/accel/op_impls.py), and the small tensor helpers both use. No torch registration here.
"""
from __future__ import annotations

import ctypes

import torch
from torch import Tensor

NS = "mobileyolo"
CL = torch.channels_last
# the C code keeps per-channel arrays on the stack: at this cap up to 256 KiB on the calling thread and
# 96 KiB on each OpenMP thread, well inside default thread stacks; detection models use a few thousand at most
MAX_CHANNELS = 8192
_MAX_ELEMS = 2 ** (8 * ctypes.sizeof(ctypes.c_long) - 1) - 1  # C indexes with `long`


def _err(op: str, msg: str) -> ValueError:
    return ValueError(f"{NS}::{op}: {msg}")


def _tensors(op: str, fake: bool, *specs: tuple[str, object, int, bool]) -> None:
    """Each spec (name, t, rank, nhwc): `t` is a strided float32 tensor of that rank, contiguous (NHWC
    memory when `nhwc`); all on one device, the CPU (or meta, when `fake`: the shape-only implementations)."""
    dev = None
    for name, t, dim, nhwc in specs:
        if not isinstance(t, Tensor):
            raise _err(op, f"{name} must be a tensor, got {type(t).__name__}")
        if t.dtype != torch.float32:
            raise _err(op, f"{name} must be float32, got {t.dtype}")
        if t.layout != torch.strided:
            raise _err(op, f"{name} must be a dense (strided) tensor, got {t.layout}")
        if dev is None:
            dev = t.device
            if dev.type != "cpu" and not (fake and dev.type == "meta"):
                raise _err(op, f"{name} must be on the CPU, got {dev}")
        elif t.device != dev:
            raise _err(op, f"all tensors must be on one device, got {specs[0][0]} on {dev} and {name} on {t.device}")
        if t.dim() != dim:
            raise _err(op, f"{name} must have {dim} dimensions, got shape {list(t.shape)}")
        if t.numel() > _MAX_ELEMS:
            raise _err(op, f"{name} has {t.numel()} elements, more than the C code can index")
        if not t.is_contiguous(memory_format=CL if nhwc else torch.contiguous_format):
            layout = "channels_last contiguous (NHWC memory)" if nhwc else "contiguous"
            raise _err(op, f"{name} must be {layout}, got strides {t.stride()}")


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


def as_nhwc(t: Tensor) -> Tensor:
    """`t` with NHWC memory (a copy only when it is not already laid out so)."""
    return t if t.is_contiguous(memory_format=CL) else t.contiguous(memory_format=CL)


def new_like(like: Tensor, shape: tuple[int, ...], nhwc: bool = False) -> Tensor:
    """An uninitialized tensor of `shape` with `like`'s dtype and device, NHWC memory when `nhwc`."""
    fmt = CL if nhwc else torch.contiguous_format
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt)


# ---- checks shared by the real (CPU) and fake (meta, `fake=True`) implementations: each `check_<op>`
# takes the op's arguments, raises ValueError for anything its C code cannot take, and returns
# (N, C, H, W) of its first tensor (dw_conv2d: of its output)

def check_bn_act_forward(x, weight, bias, running_mean, running_var, momentum, eps, act,  # noqa: ANN001, ANN201
                         fake=False):
    op = "bn_act_forward"
    _tensors(op, fake, ("x", x, 4, True), ("weight", weight, 1, False), ("bias", bias, 1, False),
             ("running_mean", running_mean, 1, False), ("running_var", running_var, 1, False))
    n, c, h, w = _channels(op, x, min_rows=2)  # BatchNorm's own rule: more than one value per channel
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        _shape(op, name, t, (c,))
    _act(op, act)
    if not (0.0 <= momentum <= 1.0 and eps >= 0.0):
        raise _err(op, f"momentum must be in [0, 1] and eps >= 0, got momentum={momentum}, eps={eps}")
    return n, c, h, w


def check_bn_act_backward(x, grad_y, weight, bias, stats, act, fake=False):  # noqa: ANN001, ANN201
    op = "bn_act_backward"
    _tensors(op, fake, ("x", x, 4, True), ("grad_y", grad_y, 4, True), ("weight", weight, 1, False),
             ("bias", bias, 1, False), ("stats", stats, 2, False))
    n, c, h, w = _channels(op, x)
    _shape(op, "grad_y", grad_y, tuple(x.shape))
    _shape(op, "weight", weight, (c,))
    _shape(op, "bias", bias, (c,))
    _shape(op, "stats", stats, (3, c))
    _act(op, act)
    return n, c, h, w


def check_dw_weight_grad(x, grad_out, kernel, stride, padding, fake=False):  # noqa: ANN001, ANN201
    op = "dw_weight_grad"
    _tensors(op, fake, ("x", x, 4, True), ("grad_out", grad_out, 4, True))
    n, c, h, w = _channels(op, x)
    if kernel < 1 or stride < 1 or padding < 0:
        raise _err(op, f"need kernel >= 1, stride >= 1, padding >= 0, got {kernel}, {stride}, {padding}")
    ho, wo = (h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1
    if ho < 1 or wo < 1:
        raise _err(op, f"a {kernel}x{kernel} kernel with padding {padding} does not fit x of shape {list(x.shape)}")
    _shape(op, "grad_out", grad_out, (n, c, ho, wo))
    return n, c, h, w


def check_dw_conv2d(x, weight, stride, padding, fake=False):  # noqa: ANN001, ANN201
    op = "dw_conv2d"
    _tensors(op, fake, ("x", x, 4, True), ("weight", weight, 4, False))
    n, c, h, w = _channels(op, x)
    k = weight.shape[-1]
    _shape(op, "weight", weight, (c, 1, k, k))
    if k < 1 or stride < 1 or padding < 0 or h + 2 * padding < k or w + 2 * padding < k:
        raise _err(op, f"kernel {k}, stride {stride}, padding {padding} do not fit x of shape {list(x.shape)}")
    return n, c, (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1


def check_se_gate_grad(x, grad_y, fake=False):  # noqa: ANN001, ANN201
    op = "se_gate_grad"
    _tensors(op, fake, ("x", x, 4, True), ("grad_y", grad_y, 4, True))
    _shape(op, "grad_y", grad_y, tuple(x.shape))
    return _channels(op, x)


def check_se_input_grad(grad_y, gate, grad_pool, fake=False):  # noqa: ANN001, ANN201
    op = "se_input_grad"
    _tensors(op, fake, ("grad_y", grad_y, 4, True), ("gate", gate, 2, False), ("grad_pool", grad_pool, 2, False))
    n, c, h, w = _channels(op, grad_y, name="grad_y")
    _shape(op, "gate", gate, (n, c))
    _shape(op, "grad_pool", grad_pool, (n, c))
    return n, c, h, w


def check_se_forward(x, w1, b1, w2, b2, fake=False):  # noqa: ANN001, ANN201
    op = "se_forward"
    _tensors(op, fake, ("x", x, 4, True), ("w1", w1, 4, False), ("b1", b1, 1, False), ("w2", w2, 4, False),
             ("b2", b2, 1, False))
    n, c, h, w = _channels(op, x)
    s = w1.shape[0]
    for name, t, want in (("w1", w1, (s, c, 1, 1)), ("b1", b1, (s,)), ("w2", w2, (c, s, 1, 1)), ("b2", b2, (c,))):
        _shape(op, name, t, want)
    return n, c, h, w
