"""Implementations behind the `mobileyolo::` custom ops (contracts: utils/accel/ops.py).

Only `ops.register()` calls `define_all()`, once: importing this module registers nothing. Each CPU
implementation runs its `checks.check_*` (CPU tensors only) before touching a pointer, also when called
directly rather than through the dispatcher; each fake implementation runs the same check (meta
tensors allowed) and only allocates the outputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from utils.accel import checks, native
from utils.accel.checks import NS, as_nhwc, new_like

_DEFS: dict[str, object] = {}  # name -> the op (torch.ops.mobileyolo.<name>) once defined here
_LIBRARY: list[torch.library.Library] = []  # the Library holding our definitions, kept alive for the process
GRAD: dict[str, object] = {}  # name -> the differentiable op's `apply` (an autograd.Function around it)


def _lib():  # noqa: ANN202 - the ctypes library
    lib = native.load()
    if lib is None:
        raise RuntimeError(f"{NS} ops: the CPU training kernels library is unavailable: "
                           f"{native.unavailable_reason()}")
    return lib


def _threads() -> int:
    return torch.get_num_threads()


# ---- BatchNorm (batch statistics) + activation

def bn_act_forward(x, weight, bias, running_mean, running_var, momentum, eps, act):  # noqa: ANN001, ANN201
    n, c, h, w = checks.check_bn_act_forward(x, weight, bias, running_mean, running_var, momentum, eps, act)
    y, stats = new_like(x, tuple(x.shape), nhwc=True), x.new_empty(3, c)
    # the C call updates running_mean / running_var in place, as BatchNorm2d's forward does (schema: a!, b!)
    if _lib().bn_act_forward(x.data_ptr(), y.data_ptr(), n * h * w, c, weight.data_ptr(), bias.data_ptr(),
                             float(eps), int(act), stats.data_ptr(), running_mean.data_ptr(), running_var.data_ptr(),
                             float(momentum), _threads()):
        raise MemoryError(f"{NS}::bn_act_forward: out of memory for its scratch")
    return y, stats


def bn_act_forward_fake(x, weight, bias, running_mean, running_var, momentum, eps, act):  # noqa: ANN001, ANN201
    _, c, _, _ = checks.check_bn_act_forward(x, weight, bias, running_mean, running_var, momentum, eps, act, fake=True)
    return new_like(x, tuple(x.shape), nhwc=True), x.new_empty(3, c)


def _bn_act_setup(ctx, inputs, output) -> Tensor:  # noqa: ANN001 - returns y; the statistics stay inside
    x, weight, bias, _, _, _, _, act = inputs
    ctx.save_for_backward(x, weight, bias, output[1])
    ctx.act = act
    return output[0]


def _bn_act_grad(ctx, gy):  # noqa: ANN001, ANN202
    x, weight, bias, stats = ctx.saved_tensors
    need_x = ctx.needs_input_grad[0]
    gx, gw, gb = torch.ops.mobileyolo.bn_act_backward(x, as_nhwc(gy), weight, bias, stats, ctx.act, need_x)
    return gx if need_x else None, gw, gb, None, None, None, None, None


def bn_act_backward(x, grad_y, weight, bias, stats, act, input_grad):  # noqa: ANN001, ANN201
    n, c, h, w = checks.check_bn_act_backward(x, grad_y, weight, bias, stats, act)
    gx = new_like(x, tuple(x.shape), nhwc=True) if input_grad else x.new_empty(0)
    gw, gb = torch.empty_like(weight), torch.empty_like(bias)
    mean, invstd = stats.data_ptr(), stats[2].data_ptr()
    if _lib().bn_act_backward(x.data_ptr(), grad_y.data_ptr(), gx.data_ptr() if input_grad else None, n * h * w, c,
                              weight.data_ptr(), bias.data_ptr(), mean, invstd, int(act), gw.data_ptr(),
                              gb.data_ptr(), _threads()):
        raise MemoryError(f"{NS}::bn_act_backward: out of memory for its scratch")
    return gx, gw, gb


def bn_act_backward_fake(x, grad_y, weight, bias, stats, act, input_grad):  # noqa: ANN001, ANN201
    checks.check_bn_act_backward(x, grad_y, weight, bias, stats, act, fake=True)
    gx = new_like(x, tuple(x.shape), nhwc=True) if input_grad else x.new_empty(0)
    return gx, torch.empty_like(weight), torch.empty_like(bias)


# ---- depthwise conv with our weight gradient

def dw_weight_grad(x, grad_out, kernel, stride, padding):  # noqa: ANN001, ANN201
    n, c, h, w = checks.check_dw_weight_grad(x, grad_out, kernel, stride, padding)
    nt = _threads()
    gw, scratch = x.new_empty(c, 1, kernel, kernel), x.new_empty(nt * kernel * kernel * c)
    _lib().dw_weight_grad(x.data_ptr(), grad_out.data_ptr(), gw.data_ptr(), n, c, h, w, grad_out.shape[2],
                          grad_out.shape[3], kernel, stride, padding, scratch.data_ptr(), nt)
    return gw


def dw_weight_grad_fake(x, grad_out, kernel, stride, padding):  # noqa: ANN001, ANN201
    _, c, _, _ = checks.check_dw_weight_grad(x, grad_out, kernel, stride, padding, fake=True)
    return x.new_empty(c, 1, kernel, kernel)


def dw_conv2d(x, weight, stride, padding):  # noqa: ANN001, ANN201
    checks.check_dw_conv2d(x, weight, stride, padding)
    return F.conv2d(x, weight, None, stride, padding, 1, x.shape[1])


def dw_conv2d_fake(x, weight, stride, padding):  # noqa: ANN001, ANN201
    return new_like(x, checks.check_dw_conv2d(x, weight, stride, padding, fake=True), nhwc=True)


def _dw_conv2d_setup(ctx, inputs, output) -> Tensor:  # noqa: ANN001
    x, weight, stride, padding = inputs
    ctx.save_for_backward(x, weight)
    ctx.stride, ctx.padding = stride, padding
    return output


def _dw_conv2d_grad(ctx, g):  # noqa: ANN001, ANN202
    x, w = ctx.saved_tensors
    s, p, c = ctx.stride, ctx.padding, x.shape[1]
    g = as_nhwc(g)
    gx = gw = None
    if ctx.needs_input_grad[0]:
        gx = torch.ops.aten.convolution_backward(g, x, w, None, [s, s], [p, p], [1, 1], False, [0, 0], c,
                                                 [True, False, False])[0]
    if ctx.needs_input_grad[1]:
        gw = torch.ops.mobileyolo.dw_weight_grad(x, g, w.shape[-1], s, p)
    return gx, gw, None, None


# ---- squeeze-excite

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


def se_forward(x, w1, b1, w2, b2):  # noqa: ANN001, ANN201
    checks.check_se_forward(x, w1, b1, w2, b2)
    pooled = x.mean((2, 3))
    gate = se_gate(pooled, w1, b1, w2, b2)
    return x * gate[:, :, None, None], pooled, gate


def se_forward_fake(x, w1, b1, w2, b2):  # noqa: ANN001, ANN201
    n, c, _, _ = checks.check_se_forward(x, w1, b1, w2, b2, fake=True)
    return new_like(x, tuple(x.shape), nhwc=True), x.new_empty(n, c), x.new_empty(n, c)


def _se_setup(ctx, inputs, output) -> Tensor:  # noqa: ANN001 - returns y; pooled and gate stay inside
    x, w1, b1, w2, b2 = inputs
    y, pooled, gate = output
    ctx.save_for_backward(x, pooled, gate, w1, b1, w2, b2)
    return y


def _se_grad(ctx, gy):  # noqa: ANN001, ANN202 - backward in two passes over x instead of six
    x, pooled, gate, *ws = ctx.saved_tensors
    gy = as_nhwc(gy)
    g_gate = torch.ops.mobileyolo.se_gate_grad(x, gy)
    grads = se_gate_backward(g_gate, pooled, *ws)
    g_pool = (grads[0] / (x.shape[2] * x.shape[3])).contiguous()
    gx = torch.ops.mobileyolo.se_input_grad(gy, gate.contiguous(), g_pool)
    return (gx, *grads[1:])


def se_gate_grad(x, grad_y):  # noqa: ANN001, ANN201
    n, c, h, w = checks.check_se_gate_grad(x, grad_y)
    gs = x.new_empty(n, c)
    _lib().se_gate_grad(x.data_ptr(), grad_y.data_ptr(), gs.data_ptr(), n, h * w, c, _threads())
    return gs


def se_gate_grad_fake(x, grad_y):  # noqa: ANN001, ANN201
    n, c, _, _ = checks.check_se_gate_grad(x, grad_y, fake=True)
    return x.new_empty(n, c)


def se_input_grad(grad_y, gate, grad_pool):  # noqa: ANN001, ANN201
    n, c, h, w = checks.check_se_input_grad(grad_y, gate, grad_pool)
    gx = new_like(grad_y, tuple(grad_y.shape), nhwc=True)
    _lib().se_input_grad(grad_y.data_ptr(), gate.data_ptr(), grad_pool.data_ptr(), gx.data_ptr(), n, h * w, c,
                         _threads())
    return gx


def se_input_grad_fake(grad_y, gate, grad_pool):  # noqa: ANN001, ANN201
    checks.check_se_input_grad(grad_y, gate, grad_pool, fake=True)
    return new_like(grad_y, tuple(grad_y.shape), nhwc=True)


# name: (schema, implementation, fake, (backward, setup_context) of the differentiable ones, or None);
# `grad_op(name)` returns y only
SPECS = {
    "bn_act_forward": ("(Tensor x, Tensor weight, Tensor bias, Tensor(a!) running_mean, Tensor(b!) running_var, "
                       "float momentum, float eps, int act) -> (Tensor, Tensor)",
                       bn_act_forward, bn_act_forward_fake, (_bn_act_grad, _bn_act_setup)),
    "bn_act_backward": ("(Tensor x, Tensor grad_y, Tensor weight, Tensor bias, Tensor stats, int act, "
                        "bool input_grad) -> (Tensor, Tensor, Tensor)", bn_act_backward, bn_act_backward_fake, None),
    "dw_weight_grad": ("(Tensor x, Tensor grad_out, int kernel, int stride, int padding) -> Tensor",
                       dw_weight_grad, dw_weight_grad_fake, None),
    "dw_conv2d": ("(Tensor x, Tensor weight, int stride, int padding) -> Tensor", dw_conv2d, dw_conv2d_fake,
                  (_dw_conv2d_grad, _dw_conv2d_setup)),
    "se_forward": ("(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2) -> (Tensor, Tensor, Tensor)",
                   se_forward, se_forward_fake, (_se_grad, _se_setup)),
    "se_gate_grad": ("(Tensor x, Tensor grad_y) -> Tensor", se_gate_grad, se_gate_grad_fake, None),
    "se_input_grad": ("(Tensor grad_y, Tensor gate, Tensor grad_pool) -> Tensor", se_input_grad, se_input_grad_fake,
                      None),
}


def _grad_function(name: str, backward, setup_context) -> type[torch.autograd.Function]:  # noqa: ANN001
    """An autograd.Function whose forward is the op `mobileyolo::<name>` and whose backward is `backward`.

    `setup_context(ctx, inputs, output)` saves what backward needs and returns the Function's one output
    (y: the op's other outputs, batch statistics and the like, stay inside, so autograd tracks one tensor).
    Why not `register_autograd`: torch's generic wrapper re-binds every argument by signature on each
    call, a fixed cost per call that added several percent to a training step of our ~60-module models.
    The op itself still runs through the dispatcher, so the profiler and the input checks see it.
    The class is named `mobileyolo_<name>`, so its grad_fn reads `mobileyolo_<name>Backward`.
    """
    op = getattr(getattr(torch.ops, NS), name)

    def forward(ctx, *inputs):  # noqa: ANN001, ANN202
        return setup_context(ctx, inputs, op(*inputs))

    return type(f"{NS}_{name}", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward)})


def define_all() -> None:
    """Define every op of SPECS that this process does not have yet (CPU kernel, fake), and `GRAD`.

    With `torch.library.Library` itself rather than `torch.library.custom_op`: the dispatcher calls our
    Python kernel directly, where custom_op's wrapper cost more per call than the smaller kernels take.
    """
    if not _LIBRARY:
        _LIBRARY.append(torch.library.Library(NS, "FRAGMENT"))
    lib = _LIBRARY[0]
    for name, (schema, impl, fake, grad) in SPECS.items():
        if name not in _DEFS and not hasattr(getattr(torch.ops, NS), name):
            lib.define(f"{name}{schema}")
            lib.impl(name, impl, "CPU")
            torch.library.register_fake(f"{NS}::{name}", fake, lib=lib)
            _DEFS[name] = getattr(getattr(torch.ops, NS), name)
        if grad is not None and name not in GRAD:
            GRAD[name] = _grad_function(name, *grad).apply
