"""The compiled CPU path (utils/infer/compiled.py, DetectBackend(compile=True), detect.py --compile).

Each real compile costs seconds, so the tiny two-level model is compiled once per module and the
failure paths replace torch.compile with fakes.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import detect
from models.yolo import Model
from tests.backend_helpers import TINY, make_checkpoint, make_images
from utils.infer import compiled as compiled_mod
from utils.infer.backend import DetectBackend
from utils.infer.compiled import CompiledDecoder
from utils.ops.decode import Decoder


def tiny_decoder() -> Decoder:
    torch.manual_seed(0)
    m = Model(TINY, nc=2).fuse().eval().to(memory_format=torch.channels_last)
    for p in m.parameters():
        p.requires_grad_(False)
    return Decoder(m).eval()


def cl(*shape: int) -> torch.Tensor:
    return torch.rand(*shape).contiguous(memory_format=torch.channels_last)


@pytest.fixture(scope="module")
def built():
    dec = tiny_decoder()
    c = CompiledDecoder.build(dec, cl(1, 3, 64, 96))
    assert c is not None, "torch.compile should work on this machine (gcc is part of the setup)"
    return dec, c


def test_compiled_matches_eager_and_records_its_shape(built):
    dec, c = built
    assert c.shape == (1, 3, 64, 96) and c.seconds > 0
    x = cl(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(c(x), dec(x), rtol=1e-4, atol=1e-3)


def test_other_shapes_and_layouts_run_eager_and_size1_strides_do_not(built, monkeypatch):
    dec, c = built
    calls = []
    real = c.fn
    monkeypatch.setattr(c, "fn", lambda x: calls.append(x.stride()) or real(x))
    with torch.no_grad():
        for x in (cl(1, 3, 96, 64), cl(2, 3, 64, 96), torch.rand(1, 3, 64, 96)):  # shape, batch, NCHW layout
            torch.testing.assert_close(c(x), dec(x), rtol=1e-4, atol=1e-3)
        assert calls == []  # none of those reached the compiled graph
        # detect.to_tensor's layout: channels_last, but the size-1 batch dim has stride 3
        img = (np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8)
        x = detect.to_tensor(img)
        assert x.stride()[0] == 3 and x.stride() != c.strides
        torch.testing.assert_close(c(x), dec(x), rtol=1e-4, atol=1e-3)
    assert calls == [c.strides]  # restrided to the graph's guards, not recompiled or eager


def test_compile_errors_fall_back_with_a_warning(monkeypatch, caplog):
    def broken(*a, **k):
        def fn(x):
            raise RuntimeError("C++ compile failed: g++ not found\nlong log")
        return fn

    monkeypatch.setattr(compiled_mod.torch, "compile", broken)
    with caplog.at_level(logging.WARNING, logger="mobileyolo.backend"):
        assert CompiledDecoder.build(tiny_decoder(), cl(1, 3, 64, 64)) is None
    assert "torch.compile failed (RuntimeError: C++ compile failed: g++ not found)" in caplog.text


def test_results_that_disagree_are_refused(monkeypatch, caplog):
    monkeypatch.setattr(compiled_mod.torch, "compile", lambda m, **k: (lambda x: m(x) + 1.0))
    with caplog.at_level(logging.WARNING, logger="mobileyolo.backend"):
        assert CompiledDecoder.build(tiny_decoder(), cl(1, 3, 64, 64)) is None
    assert "disagrees with the eager model (max error 1.0" in caplog.text


def test_non_float32_models_are_not_compiled(monkeypatch):
    monkeypatch.setattr(compiled_mod.torch, "compile", lambda *a, **k: pytest.fail("must not compile"))
    assert CompiledDecoder.build(tiny_decoder().double(), cl(1, 3, 64, 64)) is None


def test_backend_falls_back_to_packing_when_compile_fails(tmp_path, monkeypatch):
    pt = make_checkpoint(tmp_path / "w.pt")
    monkeypatch.setattr(CompiledDecoder, "build", classmethod(lambda cls, *a, **k: None))
    b, eager = DetectBackend(pt, threads=1, compile=True), DetectBackend(pt, threads=1, pack=False)
    assert not b.fixed_input and not b.compiled  # any size, until a compiled shape exists
    x = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(b(x), eager(x), rtol=1e-4, atol=1e-3)
    assert not b.compiled and b.compile_s is None and b.packed > 0 and not b.fixed_input


def test_detect_compiles_for_the_first_frame_and_letterboxes_later_frames_to_it(tmp_path, caplog):
    import cv2

    pt = make_checkpoint(tmp_path / "best.pt", names=["cell", "blob"], obj_logit=3.0)
    src = make_images(tmp_path / "imgs", n=2, size=(96, 64))[0].parent  # landscape: 64x96 after letterbox
    portrait = make_images(tmp_path / "other", n=1, size=(64, 96), seed=1)[0]
    cv2.imwrite(str(src / "z_portrait.png"), cv2.imread(str(portrait)))  # last in the folder's order
    common = {"weights": pt, "source": src, "imgsz": 96, "nosave": True, "threads": 1, "project": tmp_path}
    with caplog.at_level(logging.INFO, logger="mobileyolo.detect"):
        fast = detect.Detector(detect.DetectOptions(compile=True, name="c", **common))
        assert not fast.backend.compiled  # nothing compiled before the first frame is known
        shapes, real = [], fast.preprocess
        fast.preprocess = lambda img: (lambda r: shapes.append(tuple(r[0].shape)) or r)(real(img))
        got = [r.det for r in fast.frames()]
    assert fast.backend.compiled and shapes == [(1, 3, 64, 96)] * 3  # the portrait frame too: no eager, no recompile
    assert "compiled best.pt for 64x96" in caplog.text and "(pt, compiled)" in fast.summary()
    plain = detect.Detector(detect.DetectOptions(name="e", **common))
    want = [r.det for r in plain.frames()]
    assert not plain.backend.compiled and len(got) == 3
    boxes = got[2][:, :4]  # the portrait frame's boxes come back in its own 64x96 (w x h) pixels
    assert len(boxes) and boxes[:, [0, 2]].max() <= 64 and boxes[:, [1, 3]].max() <= 96 and boxes.min() >= 0
    for a, b in zip(got[:2], want[:2]):  # same-sized frames: the same letterbox and detections as eager
        assert a.shape == b.shape and len(a) > 0
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-2)


def test_detect_compile_on_onnx_weights_warns(tmp_path, caplog):
    import export

    pt = make_checkpoint(tmp_path / "best.pt")
    onnx = export.run(pt, ("onnx",), imgsz=64, outdir=tmp_path)["onnx"]
    src = make_images(tmp_path / "imgs", n=1, size=(64, 64))[0]
    with caplog.at_level(logging.WARNING, logger="mobileyolo.detect"):
        d = detect.Detector(detect.DetectOptions(weights=onnx, source=src, imgsz=64, compile=True, nosave=True,
                                                 project=tmp_path))
    assert "--compile applies to .pt weights only" in caplog.text and not d.backend.compiled


def test_many_compiles_in_one_process_fit_under_dynamo_limits(built, monkeypatch):
    import torch._dynamo

    # every build is a graph of the same Decoder.forward; past Dynamo's limit a fullgraph compile fails
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    c = CompiledDecoder.build(tiny_decoder(), cl(1, 3, 32, 64))
    assert c is not None and torch._dynamo.config.recompile_limit == 1  # room was scoped to the build


def test_a_compiled_graph_that_fails_later_switches_to_eager(built, monkeypatch, caplog):
    dec, c = built
    c2 = CompiledDecoder(dec, None, cl(1, 3, 64, 96), 1.0)
    c2.fn = lambda x: (_ for _ in ()).throw(RuntimeError("guard failed: recompile limit\ndetails"))
    x = cl(1, 3, 64, 96)
    with caplog.at_level(logging.WARNING, logger="mobileyolo.backend"):
        out = c2(x)
    assert "compiled model failed (RuntimeError: guard failed: recompile limit); running eager" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(out, dec(x))
    assert c2.fn is None and torch.equal(c2(x), out)  # stays eager, no second warning needed


def test_the_compile_really_freezes_and_packs_the_weights():
    import torch._inductor.config as inductor_config
    from torch._inductor.utils import run_and_get_code

    before = inductor_config.freezing
    c, code = run_and_get_code(CompiledDecoder.build, tiny_decoder(), cl(1, 3, 48, 64))
    text = "\n".join(code)
    # frozen weights are pre-packed for oneDNN: packed conv calls, no plain aten convolutions left
    assert c is not None and "_convolution_pointwise" in text and "extern_kernels.convolution(" not in text
    assert inductor_config.freezing == before  # the settings were scoped to the compile
