"""The CPU training fast path (utils/accel/train_kernels.py on the mobileyolo:: ops) against PyTorch's own kernels:
outputs, gradients and running statistics; where it must not apply."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from models.common import ConvBNAct
from models.mobilenetv3 import SELayer
from models.yolo import Model
from tests.accel.helpers import needs_cc
from utils.accel import accelerate, native, ops, train_kernels
from utils.data import load_hyp
from utils.train.loss import ComputeLoss

CL = torch.channels_last


@pytest.fixture
def lib():
    lib = native.load()
    assert lib is not None, f"kernels did not build although a compiler exists: {native.unavailable_reason()}"
    ops.register()
    return lib


def _pair(c1, c2, k, s, g, act):
    """(accelerated, plain) ConvBNAct with the same weights; the accelerated one only if it gains."""
    torch.manual_seed(0)
    a = ConvBNAct(c1, c2, k, s, g=g, act=act).train().to(memory_format=CL)
    b = ConvBNAct(c1, c2, k, s, g=g, act=act).train().to(memory_format=CL)
    with torch.no_grad():
        a.bn.weight.uniform_(0.5, 1.5)
        a.bn.bias.uniform_(-0.5, 0.5)
    b.load_state_dict(a.state_dict())
    accelerate(a)
    return a, b


def _plain(m, x):
    return m.act(m.bn(m.conv(x)))


def _close(a, b, what, rtol=1e-4):
    err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
    assert err < rtol, f"{what}: relative error {err:.2e}"


CASES = [  # c1, c2, k, s, groups, activation, H, W
    (16, 72, 1, 1, 1, nn.Hardswish(), 12, 10),    # MobileNetV3 expand
    (24, 24, 3, 2, 24, nn.ReLU(), 13, 11),        # depthwise stride 2, odd sizes
    (40, 40, 5, 1, 40, nn.Hardswish(), 9, 9),     # depthwise 5x5
    (48, 48, 5, 2, 48, nn.Hardswish(), 10, 7),    # depthwise 5x5 stride 2
    (3, 16, 3, 2, 1, nn.Hardswish(), 16, 16),     # stem
    (72, 80, 1, 1, 1, False, 6, 5),               # project: no activation, 80 channels (> one 64-channel block)
    (8, 16, 3, 1, 1, nn.SiLU(), 8, 8),            # YOLOv5 Conv: PyTorch's BatchNorm and SiLU
    (16, 16, 5, 2, 16, nn.SiLU(), 9, 9),          # a 5x5 DWConv: our weight gradient, PyTorch's BN + SiLU
]


def _graph(fn, depth=4):
    """Names of the autograd nodes up to `depth` steps behind `fn`."""
    if fn is None or depth == 0:
        return []
    return [type(fn).__name__] + [n for f, _ in fn.next_functions for n in _graph(f, depth - 1)]


@needs_cc
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-k{c[2]}s{c[3]}g{c[4]}-{type(c[5]).__name__}")
def test_conv_bn_act_matches_pytorch(case, threads, lib):
    c1, c2, k, s, g, act, h, w = case
    fast, ref = _pair(c1, c2, k, s, g, act)
    n0 = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = (torch.randn(3, c1, h, w) * 2 + 0.5).contiguous(memory_format=CL).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        y, y2 = fast(x), _plain(ref, x2)
        fused = type(fast.act) in train_kernels.ACT_CODES  # else BatchNorm and activation stay PyTorch's
        assert ("mobileyolo_bn_act_forward" in type(y.grad_fn).__name__) == fused
        # the depthwise weight gradient is ours from 5x5 up, whatever the activation
        assert ("mobileyolo_dw_conv2d" in str(_graph(y.grad_fn))) == (g > 1 and k >= train_kernels.DW_MIN_K)
        gy = torch.randn_like(y2)
        (y * gy).sum().backward()
        (y2 * gy).sum().backward()
    finally:
        torch.set_num_threads(n0)
    _close(y, y2, "output")
    _close(x.grad, x2.grad, "input grad")
    _close(fast.conv.weight.grad, ref.conv.weight.grad, "conv weight grad")
    _close(fast.bn.weight.grad, ref.bn.weight.grad, "BN weight grad")
    _close(fast.bn.bias.grad, ref.bn.bias.grad, "BN bias grad")
    _close(fast.bn.running_mean, ref.bn.running_mean, "running mean", 1e-5)
    _close(fast.bn.running_var, ref.bn.running_var, "running var", 1e-5)
    assert int(fast.bn.num_batches_tracked) == int(ref.bn.num_batches_tracked) == 1


@needs_cc
def test_gradient_from_a_slice_and_frozen_weights(lib):
    """Upstream gradients that are not channels_last (a Concat's slice) and frozen convs still agree."""
    fast, ref = _pair(32, 32, 5, 1, 32, nn.ReLU())
    for m in (fast, ref):
        m.conv.weight.requires_grad_(False)  # --freeze: no depthwise weight gradient is computed
    x = torch.randn(2, 32, 7, 9).contiguous(memory_format=CL).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y, y2 = fast(x), _plain(ref, x2)
    torch.cat([y, y * 0], 1)[:, :40].square().sum().backward()
    torch.cat([y2, y2 * 0], 1)[:, :40].square().sum().backward()
    _close(x.grad, x2.grad, "input grad")
    assert fast.conv.weight.grad is None
    _close(fast.bn.weight.grad, ref.bn.weight.grad, "BN weight grad")


@needs_cc
@pytest.mark.parametrize("k, s, c", [(5, 2, 24), (3, 1, 20), (7, 2, 8)])
def test_depthwise_weight_grad_kernel(k, s, c, lib):
    """The C depthwise weight gradient (any k, though only 5x5 and up is used) against aten's."""
    p = k // 2
    conv = nn.Conv2d(c, c, k, s, p, groups=c, bias=False)
    x = torch.randn(2, c, 11, 14).contiguous(memory_format=CL)
    y = ops.grad_op("dw_conv2d")(x, conv.weight, s, p)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    ref = torch.ops.aten.convolution_backward(g, x, conv.weight.detach(), None, [s, s], [p, p], [1, 1], False,
                                              [0, 0], c, [False, True, False])[1]
    _close(conv.weight.grad, ref, "depthwise weight grad")


@needs_cc
def test_model_training_step_matches_pytorch(lib):
    """A whole MobileNetV3-Small-YOLO step: same loss, gradients and buffers accelerated and plain."""
    torch.manual_seed(0)
    cfg = "models/mobilenetv3-small-yolo.yaml"
    a = Model(cfg, nc=3).train().to(memory_format=CL)
    b = Model(cfg, nc=3).train().to(memory_format=CL)
    b.load_state_dict(a.state_dict())
    assert accelerate(a) > 0
    x = torch.rand(2, 3, 96, 96).contiguous(memory_format=CL)
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.4], [1, 0, 0.3, 0.6, 0.2, 0.2]])
    loss_fn = ComputeLoss(a.detect.anchors, a.detect.stride, 3, load_hyp(), imgsz=96)
    with torch.profiler.profile() as prof:
        la, _ = loss_fn(a(x), targets)
        la.backward()
    ran = {e.key for e in prof.key_averages()}
    assert {"mobileyolo::bn_act_forward", "mobileyolo::bn_act_backward", "mobileyolo::dw_weight_grad",
            "mobileyolo::se_gate_grad", "mobileyolo::se_input_grad"} <= ran
    lb, _ = loss_fn(b(x), targets)
    lb.backward()
    _close(la.detach(), lb.detach(), "loss")
    # gradients that are zero in exact arithmetic (a bias that the next BatchNorm subtracts out) are
    # rounding noise in both, so each is compared relative to the largest gradient of the model
    scale = max(p.grad.abs().max().item() for p in b.parameters())
    worst = max(((pa.grad - pb.grad).abs().max() / pb.grad.abs().max().clamp_min(1e-3 * scale)).item()
                for pa, pb in zip(a.parameters(), b.parameters()))
    assert worst < 1e-3, f"largest relative gradient difference {worst:.2e}"
    for (name, ba), bb in zip(a.named_buffers(), b.buffers()):  # means behind a BatchNorm are ~1e-9: atol
        assert torch.allclose(ba.float(), bb.float(), rtol=1e-4, atol=1e-6), name


@needs_cc
@pytest.mark.parametrize("why", ["eval", "no_grad", "float64", "nchw", "syncbn", "strided_stats", "fused", "bn_eval"])
def test_falls_back_where_it_does_not_apply(why, lib):
    m = ConvBNAct(8, 8, 3, 1, act=nn.ReLU()).train().to(memory_format=CL)
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=CL)
    if why == "eval":
        m.eval()
    elif why == "float64":
        m, x = m.double(), x.double()
    elif why == "nchw":
        x = x.contiguous()
    elif why == "strided_stats":  # the C kernel updates running stats as plain arrays: not a strided view
        m.bn.running_mean = torch.zeros(16)[::2]
    elif why == "syncbn":
        m.bn = nn.SyncBatchNorm(8)
    elif why == "fused":  # BatchNorm folded into the conv: nothing left for the kernel
        m.fuse()
    elif why == "bn_eval":  # a BatchNorm held in eval mode inside a training model keeps its statistics
        m.bn.eval()
    accelerate(m)
    with torch.no_grad() if why == "no_grad" else torch.enable_grad():
        assert train_kernels.conv_bn_act(m, x) is None
        if why != "syncbn":  # SyncBatchNorm needs a process group to run
            with torch.profiler.profile() as prof:
                y = m(x)
            assert not any(e.key.startswith("mobileyolo::") for e in prof.key_averages())
            assert torch.equal(y, ConvBNAct.forward(m, x))  # exactly the plain forward


@needs_cc
@pytest.mark.parametrize("momentum", [0.1, 0.03])
def test_running_statistics_follow_pytorch_over_steps(momentum, lib):
    """The C kernel updates BatchNorm's running mean and (unbiased) variance; after several steps they
    still match PyTorch's, and the counter moves once per step."""
    fast, ref = _pair(16, 24, 1, 1, 1, nn.Hardswish())
    fast.bn.momentum = ref.bn.momentum = momentum
    for step in range(1, 4):
        x = (torch.randn(2, 16, 5, 7) * (step + 1) + step).contiguous(memory_format=CL)
        y = fast(x)
        assert "mobileyolo_bn_act_forward" in type(y.grad_fn).__name__
        _plain(ref, x)
        _close(fast.bn.running_mean, ref.bn.running_mean, f"running mean, step {step}", 1e-5)
        _close(fast.bn.running_var, ref.bn.running_var, f"running var, step {step}", 1e-5)
        assert int(fast.bn.num_batches_tracked) == step


@needs_cc
def test_one_value_per_channel_keeps_batchnorms_error(lib):
    m = ConvBNAct(8, 8, 1, 1, act=nn.ReLU()).train().to(memory_format=CL)
    accelerate(m)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(torch.randn(1, 8, 1, 1).contiguous(memory_format=CL))


def test_missing_compiler_warns_and_falls_back(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("MOBILEYOLO_CACHE", str(tmp_path / "cache"))
    native.reset()
    try:
        lines = []
        with caplog.at_level(logging.WARNING, logger="mobileyolo.native"):
            m = ConvBNAct(4, 4, 1, 1, act=nn.Hardswish()).train().to(memory_format=CL)
            assert accelerate(m, log=lines.append) == 0
        assert "no-such-cc" in caplog.text and "PyTorch's" in caplog.text
        assert len(lines) == 1 and "unavailable" in lines[0] and "no-such-cc" in lines[0]
        assert not list((tmp_path / "cache").glob("*"))  # nothing half written is left behind
        assert type(m) is ConvBNAct and train_kernels.conv_bn_act(m, torch.randn(2, 4, 3, 3)) is None
        m(torch.randn(2, 4, 3, 3).contiguous(memory_format=CL)).sum().backward()
        assert m.conv.weight.grad is not None
    finally:
        native.reset()


@needs_cc
@pytest.mark.parametrize("threads,scale", [(1, 1.0), (2, 1.0), (2, 40.0)])
def test_squeeze_excite_matches_pytorch(threads, scale, lib):
    torch.manual_seed(0)
    se, ref = SELayer(40).train(), SELayer(40).train()
    ref.load_state_dict(se.state_dict())
    accelerate(se)
    x = (torch.randn(3, 40, 7, 9) * scale).contiguous(memory_format=CL).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    if scale > 1:  # large inputs push some gates past hardsigmoid's +-3 knees, where its slope is zero
        with torch.no_grad():
            a2 = se.fc2(torch.relu(se.fc1(x.mean((2, 3), keepdim=True))))
        assert ((a2 > 3) | (a2 < -3)).any() and ((a2 > -3) & (a2 < 3)).any()
    n0 = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = se(x)
        assert "mobileyolo_se_forward" in type(y.grad_fn).__name__
        gy = torch.randn_like(y)
        y.backward(gy.contiguous())  # NCHW upstream gradient: copied to channels_last inside
        y2 = ref(x2)
        y2.backward(gy)
    finally:
        torch.set_num_threads(n0)
    assert "mobileyolo" not in type(y2.grad_fn).__name__
    _close(y, y2, "output")
    for what, a, b in zip(["x", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"],
                          [x.grad] + [p.grad for p in se.parameters()], [x2.grad] + [p.grad for p in ref.parameters()]):
        _close(a, b, f"{what} grad")
