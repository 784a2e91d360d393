"""The CPU inference kernels (utils/native_infer.py, utils/cpu_infer_kernels.c) against PyTorch's layers."""
from __future__ import annotations

import logging
import shutil

import pytest
import torch
from torch import nn

from models.common import ConvBNAct
from models.mobilenetv3 import SELayer
from models.yolo import Model
from tests.backend_helpers import make_checkpoint
from utils import native, native_infer
from utils.backend import DetectBackend
from utils.native_infer import (
    DepthwiseConvAct,
    SqueezeExciteNative,
    eligible_depthwise,
    swap_native,
)

CL = torch.channels_last
SMALL = "models/mobilenetv3-small-yolo.yaml"
needs_cc = pytest.mark.skipif(native.compiler() is None or not shutil.which(native.compiler()),
                              reason="no C compiler: the kernels cannot be built here")
# MobileNetV3 blocks (ReLU and h-swish, 3x3 and 5x5, SE) plus a squeeze-excite as a row of its own
TINY_MNV3 = {
    "nc": 2, "depth_multiple": 1.0, "width_multiple": 1.0,
    "anchors": [[8, 8, 14, 14, 20, 20], [24, 24, 34, 34, 48, 48]],
    "backbone": [
        [-1, 1, "conv_bn_hswish", [16, 2]],  # 0 /2
        [-1, 1, "MobileNetV3_InvertedResidual", [16, 16, 3, 2, 1, 0]],  # 1 /4
        [-1, 1, "MobileNetV3_InvertedResidual", [24, 72, 3, 2, 0, 1]],  # 2 /8
        [-1, 1, "SELayer", []],  # 3
        [-1, 1, "MobileNetV3_InvertedResidual", [40, 96, 5, 2, 1, 1]],  # 4 /16
    ],
    "head": [[[3, 4], 1, "Detect", ["nc", "anchors"]]],
}


@pytest.fixture
def lib():
    native.reset()
    got = native.load("infer")
    assert got is not None, f"kernels did not build although a compiler exists: {native.unavailable_reason('infer')}"
    return got


@pytest.fixture
def any_batch(monkeypatch):
    """Let the kernels take batches above MAX_BATCH, so that their batch loops are tested too."""
    monkeypatch.setattr(native_infer, "MAX_BATCH", 64)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    n = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(n)


def _cl(*shape: int) -> torch.Tensor:
    return torch.randn(*shape).contiguous(memory_format=CL)


def _fused(cfg, nc: int = 2) -> Model:
    torch.manual_seed(0)
    return Model(cfg, nc=nc).fuse().eval().to(memory_format=CL)


@needs_cc
@pytest.mark.parametrize("c,h,w,k,s,act", [
    (16, 20, 20, 3, 1, nn.ReLU()), (24, 17, 9, 3, 2, nn.Hardswish()), (40, 12, 12, 5, 1, nn.Hardswish()),
    (72, 11, 14, 5, 2, nn.Identity()),  # the four kernels with a row-blocked loop
    (13, 9, 9, 3, 1, nn.ReLU()), (36, 6, 6, 5, 2, nn.Hardswish()),  # channels past a multiple of 8 / 16
    (16, 8, 8, 7, 1, nn.ReLU()), (8, 5, 5, 1, 1, nn.Identity()),  # kernels only the per-pixel loop takes
    (32, 1, 1, 3, 1, nn.Hardswish()), (32, 2, 3, 5, 2, nn.ReLU()),  # maps smaller than the kernel
])
def test_depthwise_matches_pytorch(lib, any_batch, threads, c, h, w, k, s, act):
    torch.manual_seed(0)
    conv = nn.Conv2d(c, c, k, s, k // 2, groups=c).eval()
    ours = DepthwiseConvAct(conv, act)
    for x in (_cl(1, c, h, w), _cl(3, c, h, w), torch.randn(2, c, h, w)):  # NCHW input is made NHWC
        with torch.inference_mode():
            y, ref = ours(x), act(conv(x))
        assert y.shape == ref.shape and y.is_contiguous(memory_format=CL)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@needs_cc
def test_depthwise_falls_back_for_inputs_it_does_not_take(lib):
    conv = nn.Conv2d(8, 8, 3, 1, 1, groups=8).eval()
    ours = DepthwiseConvAct(conv, nn.ReLU())
    x = torch.randn(1, 8, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        y = ours.double()(x)  # float64: PyTorch's conv runs (the module's own conv, moved with it)
        assert y.dtype == torch.float64
        torch.testing.assert_close(y, torch.relu(conv(x)))
    with pytest.raises(ValueError, match="16 channels"):
        ours.float()(torch.randn(1, 16, 6, 6))
    x = torch.randn(1, 8, 6, 6, requires_grad=True)  # a gradient is wanted: PyTorch's layers, with autograd
    ours(x).sum().backward()
    assert x.grad is not None and conv.weight.grad is not None


@needs_cc
def test_kernels_run_only_within_the_limits(lib, monkeypatch):
    torch.manual_seed(0)
    conv, se = nn.Conv2d(8, 8, 3, 1, 1, groups=8).eval(), SELayer(8).eval()
    mods = [DepthwiseConvAct(conv, nn.ReLU()), SqueezeExciteNative(se)]
    calls = []
    for m in mods:
        real = m._call
        m._call = lambda *a, real=real: calls.append(1) or real(*a)
    monkeypatch.setattr(native_infer, "MAX_VALUES", 8 * 16 * 16)
    refs = [lambda x: torch.relu(conv(x)), se]
    for shape, runs in [((1, 8, 16, 16), True), ((2, 8, 4, 4), False), ((1, 8, 17, 16), False)]:
        x = _cl(*shape)
        for m, ref in zip(mods, refs):
            calls.clear()
            with torch.inference_mode():
                torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)
            assert bool(calls) == runs, (shape, type(m).__name__)
    with torch.inference_mode():  # a batch the kernels would not take: nothing is swapped, packing is left
        assert swap_native(_fused(TINY_MNV3), _cl(2, 3, 64, 64)) == 0


def test_depthwise_eligibility():
    ok = nn.Conv2d(8, 8, 3, 1, 1, groups=8)
    assert eligible_depthwise(ok, nn.ReLU())
    for conv, act in [(ok, nn.SiLU()), (nn.Conv2d(8, 8, 3, 1, 1, groups=4), nn.ReLU()),
                      (nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False), nn.ReLU()),
                      (nn.Conv2d(8, 8, 3, 1, 2, dilation=2, groups=8), nn.ReLU()),
                      (nn.Conv2d(8, 8, (3, 5), 1, (1, 2), groups=8), nn.ReLU()),
                      (nn.Conv2d(8, 8, 3, 1, 1, groups=8, padding_mode="reflect"), nn.ReLU())]:
        assert not eligible_depthwise(conv, act)
        with pytest.raises(ValueError, match="not a depthwise conv"):
            DepthwiseConvAct(conv, act)


@needs_cc
@pytest.mark.parametrize("b,c,h,w,squeeze", [(1, 16, 40, 40, 8), (2, 96, 5, 7, 24), (1, 576, 10, 10, 144),
                                             (1, 20, 1, 1, None), (3, 72, 9, 3, None)])
def test_squeeze_excite_matches_pytorch(lib, any_batch, threads, b, c, h, w, squeeze):
    torch.manual_seed(0)
    se = SELayer(c, squeeze).eval()
    ours = SqueezeExciteNative(se)
    for x in (_cl(b, c, h, w) * 3, torch.randn(b, c, h, w)):
        with torch.inference_mode():
            y, ref = ours(x), se(x)
        assert y.shape == ref.shape and y.is_contiguous(memory_format=CL)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@needs_cc
def test_swap_matches_eager_and_keeps_the_graph(lib, any_batch):
    m = _fused(TINY_MNV3)
    se_rows = [i for i, layer in enumerate(m.layers) if isinstance(layer, SELayer)]
    dws = sum(isinstance(x, ConvBNAct) and eligible_depthwise(x.conv, x.act) for x in m.modules())
    ses = sum(isinstance(x, SELayer) for x in m.modules())
    x, other = _cl(1, 3, 64, 64), _cl(2, 3, 96, 32)
    with torch.inference_mode():
        ref, ref_other = m(x), m(other)
        n = swap_native(m, x)
        out, out_other = m(x), m(other)  # another batch and shape than the example
    assert se_rows == [3] and dws == 3 and ses == 3
    assert n == dws + ses == sum(isinstance(x, (DepthwiseConvAct, SqueezeExciteNative)) for x in m.modules())
    row = m.layers[3]
    assert isinstance(row, SqueezeExciteNative) and (row.i, row.f, row.type) == (3, -1, "SELayer")
    for a, b in zip(ref + ref_other, out + out_other):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@needs_cc
def test_swap_restores_everything_when_results_disagree(lib, monkeypatch, caplog):
    m = _fused(TINY_MNV3)
    x = _cl(1, 3, 64, 64)
    with torch.inference_mode():
        ref = m(x)
    real = DepthwiseConvAct.forward
    monkeypatch.setattr(DepthwiseConvAct, "forward", lambda self, x: real(self, x) + 1.0)  # a wrong kernel
    with caplog.at_level(logging.WARNING, logger="mobileyolo.backend"), torch.inference_mode():
        assert swap_native(m, x) == 0
        out = m(x)
    assert "disagree" in caplog.text
    assert not any(isinstance(x, (DepthwiseConvAct, SqueezeExciteNative)) for x in m.modules())
    assert isinstance(m.layers[3], SELayer) and m.layers[3].i == 3
    for a, b in zip(ref, out):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_swap_does_nothing_without_the_library(monkeypatch):
    monkeypatch.setenv("MOBILEYOLO_CPU_KERNELS", "0")
    native.reset()
    try:
        m = _fused(TINY_MNV3)
        with torch.inference_mode():
            assert swap_native(m, _cl(1, 3, 64, 64)) == 0
        assert "MOBILEYOLO_CPU_KERNELS=0" in native.unavailable_reason("infer")
        unswapped = Model(TINY_MNV3, nc=2).eval()  # BN not folded: no depthwise conv qualifies either
        assert not any(isinstance(x, ConvBNAct) and eligible_depthwise(x.conv, x.act) for x in unswapped.modules())
    finally:
        native.reset()


@needs_cc
def test_backend_uses_the_kernels_and_matches_without(lib, tmp_path):
    pt = make_checkpoint(tmp_path / "mnv3.pt", cfg=SMALL, nc=3, imgsz=64)
    on, off = DetectBackend(pt), DetectBackend(pt, native=False)
    x = torch.rand(1, 3, 96, 128)
    a, b = on(x), off(x)
    model = _fused(SMALL, nc=3)
    dws = sum(isinstance(x, ConvBNAct) and eligible_depthwise(x.conv, x.act) for x in model.modules())
    ses = sum(isinstance(x, SELayer) for x in model.modules())
    assert (dws, ses) == (17, 9)  # MobileNetV3-Small-YOLO: 11 depthwise convs in the backbone, 6 in the neck
    assert on.native == dws + ses and off.native == 0
    assert on.packed > 0 and off.packed > on.packed  # convs we run are not also packed
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    x2 = torch.rand(2, 3, 64, 64)  # another batch and size after the swap
    torch.testing.assert_close(on(x2), off(x2), rtol=1e-4, atol=1e-4)


def test_infer_library_has_its_own_cached_file():
    cc = native.compiler() or "cc"
    paths = native.library_path(cc, "infer"), native.library_path(cc, "train")
    assert paths[0].name.startswith("cpu_infer_kernels-") and paths[1].name.startswith("cpu_train_kernels-")
    assert "-ffp-contract=fast" in native.LIBRARIES["infer"].flags
