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
Differentiable ops (call them through `grad_op(name)`, an autograd.Function around the op whose
backward uses the kernel ops; the op itself has no autograd formula, so calling it directly on tensors
that require grad gives outputs autograd cannot differentiate):
    bn_act_forward(x NHWC, weight, bias, running_mean, running_var, momentum, eps, act)
        -> (y NHWC, stats [3, C] = batch mean, biased var, invstd)
        y = act(BatchNorm(x)) with batch statistics; updates running_mean and running_var in place
        (schema `Tensor(a!)`, `Tensor(b!)`) as BatchNorm2d's forward does (momentum, unbiased variance).
    dw_conv2d(x NHWC, weight [C, 1, k, k], stride, padding) -> F.conv2d(x, weight, None, stride,
        padding, groups=C); its weight gradient is `dw_weight_grad`, its input gradient aten's.
    se_forward(x NHWC, w1 [S, C, 1, 1], b1 [S], w2 [C, S, 1, 1], b2 [C]) -> (y, pooled [N, C], gate [N, C]):
        SELayer, y = x * hardsigmoid(w2 relu(w1 mean_hw(x) + b1) + b2); backward in two passes over x.
`act`: 0 identity, 1 ReLU, 2 hard-swish (`ACT_CODES` in utils/accel/train_kernels.py).

Every op checks its inputs in Python (utils/accel/checks.py) before the C call: dtype float32, device
CPU, strided layout, rank and shapes that agree, the memory layout above, `act` and the geometry in
range. A violation raises ValueError naming the op and the argument; nothing reaches C that would read
past a buffer.
Fake (meta) implementations make the same checks and give the output shapes without running C.
Kernels are registered for the CPU only: for other backends (CUDA, sparse) the dispatcher itself
raises NotImplementedError; mixed devices reach the fake and are refused there.
"""
from __future__ import annotations

import threading

from utils.accel import op_impls
from utils.accel.checks import MAX_CHANNELS, NS

__all__ = ["MAX_CHANNELS", "NS", "grad_op", "is_registered", "register"]
_LOCK = threading.Lock()
_REGISTERED: list[bool] = []  # non-empty once register() has run in this process


def register() -> None:
    """Define the `mobileyolo::` ops in this process; later calls (from any thread) do nothing."""
    if _REGISTERED:
        return
    with _LOCK:
        if _REGISTERED:
            return
        op_impls.define_all()
        _REGISTERED.append(True)


def is_registered() -> bool:
    """Whether `register()` has run in this process."""
    return bool(_REGISTERED)


def grad_op(name: str):  # noqa: ANN201 - Callable[..., Tensor]
    """The differentiable form of op `name` (bn_act_forward, dw_conv2d, se_forward): same arguments, returns
    y only (the op's first output); registers the ops first."""
    register()
    return op_impls.GRAD[name]
