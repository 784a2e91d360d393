"""The mobileyolo:: custom ops (utils/accel/ops.py): each refuses what its C code cannot take, shows in the
profiler, has shapes without running C (meta), and registers lazily, once, from any thread."""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.accel.helpers import needs_cc
from utils.accel import native, op_impls, ops

CL = torch.channels_last
ROOT = Path(__file__).resolve().parents[2]
pytestmark = needs_cc


@pytest.fixture(autouse=True)
def registered():
    assert native.load() is not None, native.unavailable_reason()
    ops.register()


def nhwc(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device).contiguous(memory_format=CL)


def vec(c, device="cpu"):
    return torch.rand(c, device=device) + 0.5


def bn_args(n=2, c=8, h=5, w=6, device="cpu"):
    return [nhwc(n, c, h, w, device=device), vec(c, device), vec(c, device), torch.zeros(c, device=device),
            torch.ones(c, device=device), 0.1, 1e-3, 2]


def bn_bwd_args(n=2, c=8, h=5, w=6):
    return [nhwc(n, c, h, w), nhwc(n, c, h, w), vec(c), vec(c), torch.rand(3, c), 2, True]


def se_args(n=2, c=16, s=8, h=5, w=6):
    return [nhwc(n, c, h, w), torch.randn(s, c, 1, 1), torch.randn(s), torch.randn(c, s, 1, 1), torch.randn(c)]


def _set(args, i, value):
    args = list(args)
    args[i] = value(args[i]) if callable(value) else value
    return args


BAD = {  # id: (op name, args, message fragment)
    "bn-float64": ("bn_act_forward", _set(bn_args(), 0, lambda x: x.double()), "x must be float32"),
    "bn-nchw": ("bn_act_forward", _set(bn_args(), 0, lambda x: x.contiguous()), "channels_last"),
    "bn-3d": ("bn_act_forward", _set(bn_args(), 0, torch.randn(2, 8, 5)), "4 dimensions"),
    "bn-weight-short": ("bn_act_forward", _set(bn_args(), 1, vec(7)), "weight must have shape [8]"),
    "bn-running-var-long": ("bn_act_forward", _set(bn_args(), 4, torch.ones(9)), "running_var must have shape [8]"),
    "bn-strided-mean": ("bn_act_forward", _set(bn_args(), 3, torch.zeros(16)[::2]), "running_mean must be contiguous"),
    "bn-int-bias": ("bn_act_forward", _set(bn_args(), 2, torch.ones(8, dtype=torch.int32)), "bias must be float32"),
    "bn-one-value": ("bn_act_forward", _set(bn_args(), 0, nhwc(1, 8, 1, 1)), "at least 2 values per channel"),
    "bn-act-code": ("bn_act_forward", _set(bn_args(), 7, 5), "act must be"),
    "bn-momentum": ("bn_act_forward", _set(bn_args(), 5, 1.5), "momentum must be in"),
    "bn-too-many-channels": ("bn_act_forward", bn_args(n=1, c=ops.MAX_CHANNELS + 1, h=1, w=2), "channels"),
    "bnb-grad-shape": ("bn_act_backward", _set(bn_bwd_args(), 1, nhwc(2, 8, 5, 5)), "grad_y must have shape"),
    "bnb-grad-nchw": ("bn_act_backward", _set(bn_bwd_args(), 1, torch.randn(2, 8, 5, 6)), "channels_last"),
    "bnb-stats": ("bn_act_backward", _set(bn_bwd_args(), 4, torch.rand(2, 8)), "stats must have shape [3, 8]"),
    "dw-grad-size": ("dw_weight_grad", [nhwc(2, 8, 9, 9), nhwc(2, 8, 9, 8), 5, 1, 2], "grad_out must have shape"),
    "dw-channels": ("dw_weight_grad", [nhwc(2, 8, 9, 9), nhwc(2, 4, 9, 9), 5, 1, 2], "grad_out must have shape"),
    "dw-stride0": ("dw_weight_grad", [nhwc(2, 8, 9, 9), nhwc(2, 8, 9, 9), 5, 0, 2], "stride >= 1"),
    "dw-kernel-too-big": ("dw_weight_grad", [nhwc(2, 8, 3, 3), nhwc(2, 8, 1, 1), 9, 1, 0], "does not fit"),
    "dwc-weight": ("dw_conv2d", [nhwc(2, 8, 9, 9), torch.randn(8, 2, 5, 5), 1, 2], "weight must have shape"),
    "dwc-nchw": ("dw_conv2d", [torch.randn(2, 8, 9, 9), torch.randn(8, 1, 5, 5), 1, 2], "channels_last"),
    "se-w1": ("se_forward", _set(se_args(), 1, torch.randn(8, 15, 1, 1)), "w1 must have shape"),
    "se-b2": ("se_forward", _set(se_args(), 4, torch.randn(15)), "b2 must have shape"),
    "se-half": ("se_forward", _set(se_args(), 0, lambda x: x.half()), "x must be float32"),
    "seg-shape": ("se_gate_grad", [nhwc(2, 16, 5, 6), nhwc(2, 16, 6, 5)], "grad_y must have shape"),
    "sei-gate": ("se_input_grad", [nhwc(2, 16, 5, 6), torch.rand(2, 15), torch.rand(2, 16)], "gate must have shape"),
    "sei-pool-t": ("se_input_grad", [nhwc(2, 16, 5, 6), torch.rand(2, 16), torch.rand(16, 2).t()], "contiguous"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_is_refused_before_c(case):
    name, args, msg = BAD[case]
    with pytest.raises(ValueError, match=f"mobileyolo::{name}: .*{re.escape(msg)}"):
        getattr(torch.ops.mobileyolo, name)(*args)


def test_sparse_tensor_is_refused():
    """The dispatcher has no sparse kernel for the ops; called around it, the implementation refuses too."""
    args = _set(bn_args(), 1, lambda w: w.to_sparse())
    with pytest.raises(NotImplementedError, match="SparseCPU"):
        torch.ops.mobileyolo.bn_act_forward(*args)
    with pytest.raises(ValueError, match="weight must be a dense"):
        op_impls.bn_act_forward(*args)


@pytest.mark.parametrize("name", ["bn_act_forward", "dw_weight_grad", "se_forward"])
def test_wrong_device_is_refused(name):
    """One tensor on another device: the call is refused (here: meta beside CPU, as no GPU is needed)."""
    args = {"bn_act_forward": bn_args(), "dw_weight_grad": [nhwc(2, 8, 9, 9), nhwc(2, 8, 9, 9), 5, 1, 2],
            "se_forward": se_args()}[name]
    args[1] = args[1].to("meta")
    with pytest.raises(ValueError, match="device|CPU"):
        getattr(torch.ops.mobileyolo, name)(*args)


def test_real_implementation_never_takes_a_meta_tensor():
    """Called directly (around the dispatcher), the C-backed implementations refuse non-CPU tensors."""
    with pytest.raises(ValueError, match="must be on the CPU, got meta"):
        op_impls.bn_act_forward(*bn_args(device="meta"))


def test_meta_tensors_give_shapes_without_running_c():
    y, stats = torch.ops.mobileyolo.bn_act_forward(*bn_args(device="meta"))
    assert y.device.type == "meta" and y.shape == (2, 8, 5, 6) and y.is_contiguous(memory_format=CL)
    assert stats.shape == (3, 8)
    x = torch.empty(2, 8, 11, 9, device="meta").contiguous(memory_format=CL)
    assert torch.ops.mobileyolo.dw_conv2d(x, torch.empty(8, 1, 5, 5, device="meta"), 2, 2).shape == (2, 8, 6, 5)
    with pytest.raises(ValueError, match="weight must have shape"):  # the same checks as on the CPU
        torch.ops.mobileyolo.dw_conv2d(x, torch.empty(8, 1, 5, 3, device="meta"), 2, 2)


def test_every_op_shows_in_the_profiler():
    x = nhwc(2, 8, 9, 9).requires_grad_()
    w = torch.randn(8, 1, 5, 5, requires_grad=True)
    bn = [vec(8).requires_grad_(), vec(8).requires_grad_(), torch.zeros(8), torch.ones(8), 0.1, 1e-3, 2]
    se = [torch.randn(8, 8, 1, 1, requires_grad=True), torch.randn(8, requires_grad=True),
          torch.randn(8, 8, 1, 1, requires_grad=True), torch.randn(8, requires_grad=True)]
    with torch.profiler.profile() as prof:
        y = ops.grad_op("dw_conv2d")(x, w, 1, 2)
        y = ops.grad_op("bn_act_forward")(y, *bn)
        ops.grad_op("se_forward")(y, *se).square().sum().backward()
    seen = {e.key for e in prof.key_averages()}
    assert {f"mobileyolo::{n}" for n in op_impls.SPECS} <= seen, sorted(k for k in seen if "mobileyolo" in k)


def test_bn_op_updates_the_running_statistics_in_place_only():
    """As BatchNorm2d's forward: running mean / var move by `momentum` (unbiased variance), in place;
    x, weight and bias are left alone."""
    args = bn_args()
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    rm, rv = args[3], args[4]
    ptrs = rm.data_ptr(), rv.data_ptr()
    y, stats = torch.ops.mobileyolo.bn_act_forward(*args)
    assert all(torch.equal(a, b) for a, b in zip(args[:3], before[:3]))
    assert (rm.data_ptr(), rv.data_ptr()) == ptrs
    x = args[0]
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=True)
    assert torch.allclose(rm, 0.9 * before[3] + 0.1 * mean, atol=1e-6)
    assert torch.allclose(rv, 0.9 * before[4] + 0.1 * var, atol=1e-5)
    assert torch.allclose(stats[0], mean, atol=1e-6)


def test_registration_is_lazy_and_once_from_two_threads():
    """In a fresh process: importing every accel module registers nothing and loads nothing; two threads
    that register (and load) at once both find the ops, defined once."""
    code = textwrap.dedent("""
        import threading, torch
        import utils.accel, utils.accel.ops as ops, utils.accel.op_impls as impls, utils.accel.checks
        import utils.accel.swap, utils.accel.train_kernels, utils.accel.native as native
        assert not hasattr(torch.ops.mobileyolo, "bn_act_forward") and not ops.is_registered()
        assert native._STATE == {}, native._STATE
        calls, real = [], impls.define_all
        impls.define_all = lambda: (calls.append(1), real())[1]
        start, errors = threading.Barrier(2), []
        def work():
            start.wait()
            try:
                ops.register()
                native.load()
            except Exception as e:
                errors.append(repr(e))
        ts = [threading.Thread(target=work) for _ in range(2)]
        [t.start() for t in ts]
        [t.join() for t in ts]
        assert not errors and calls == [1], (errors, calls)
        assert hasattr(torch.ops.mobileyolo, "se_forward") and len(impls._DEFS) == len(impls.SPECS)
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]
