"""The compiled CPU path (utils/infer/compiled.py, DetectBackend(compile=True), detect.py --compile).

Each real compile costs seconds (those tests are marked slow); the failure paths replace torch.compile with
fakes. Tests assert outputs and behaviour (eager parity, no recompiles, eager fallbacks), never what
Inductor generates, and each starts from a reset Dynamo (`fresh_dynamo`), so their order does not matter.
"""
from __future__ import annotations

import logging
import warnings

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


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test starts and ends with an empty Dynamo cache and the Dynamo/Inductor settings it found, so
    no test depends on which graphs, cache entries or patched limits an earlier one left behind."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    saved = torch._dynamo.config.save_config(), inductor_config.save_config()
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    with warnings.catch_warnings():  # loading writes every key back, deprecated ones too (FutureWarning)
        warnings.simplefilter("ignore", FutureWarning)
        torch._dynamo.config.load_config(saved[0])
        inductor_config.load_config(saved[1])


@pytest.fixture()
def built():
    dec = tiny_decoder()
    c = CompiledDecoder.build(dec, cl(1, 3, 64, 96))
    assert c is not None, "torch.compile should work on this machine (gcc is part of the setup)"
    return dec, c


@pytest.mark.slow
def test_compiled_matches_eager_never_recompiles_and_runs_other_shapes_eager(built, monkeypatch, caplog):
    import torch._dynamo

    dec, c = built
    assert c.shape == (1, 3, 64, 96) and c.seconds > 0
    calls = []
    real = c.fn
    monkeypatch.setattr(c, "fn", lambda x: calls.append(tuple(x.shape)) or real(x))
    # same-shape frames reach the compiled graph, agree with eager, and never recompile: a recompile would
    # raise here, and the decoder would then log a warning and drop to eager (c.fn None)
    img = (np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8)
    frames = [cl(1, 3, 64, 96) for _ in range(3)] + [detect.to_tensor(img)]
    assert frames[-1].stride()[0] == 3 and frames[-1].stride() != c.strides  # detect.to_tensor's size-1 batch dim
    with torch._dynamo.config.patch(error_on_recompile=True), caplog.at_level(logging.WARNING, "mobileyolo.backend"):
        with torch.no_grad():
            for x in frames:
                torch.testing.assert_close(c(x), dec(x), rtol=1e-4, atol=1e-3)
    assert len(calls) == len(frames) and c.fn is not None and "compiled model failed" not in caplog.text
    # another shape, batch or memory layout runs the eager decoder: same numbers, the graph is not called
    calls.clear()
    with torch.no_grad():
        for x in (cl(1, 3, 96, 64), cl(2, 3, 64, 96), torch.rand(1, 3, 64, 96)):
            torch.testing.assert_close(c(x), dec(x), rtol=1e-4, atol=1e-3)
    assert calls == []


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


def test_backend_runs_eager_when_compile_fails(tmp_path, monkeypatch):
    pt = make_checkpoint(tmp_path / "w.pt")
    monkeypatch.setattr(CompiledDecoder, "build", classmethod(lambda cls, *a, **k: None))
    b, eager = DetectBackend(pt, threads=1, compile=True), DetectBackend(pt, threads=1)
    assert not b.fixed_input and not b.compiled  # any size, until a compiled shape exists
    for shape in ((1, 3, 64, 64), (2, 3, 64, 96)):  # the failed compile is not retried, any shape runs
        x = torch.rand(*shape)
        torch.testing.assert_close(b(x), eager(x), rtol=1e-4, atol=1e-3)
    assert not b.compiled and b.compile_s is None and not b.fixed_input


@pytest.mark.slow
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


@pytest.mark.slow
def test_many_compiles_in_one_process_fit_under_dynamo_limits():
    import torch._dynamo
    import torch._inductor.config as inductor_config

    inductor_before = {k: getattr(inductor_config, k) for k in compiled_mod.OPTIONS}
    # every build is a graph of the same Decoder.forward; past Dynamo's limit a fullgraph compile fails
    with torch._dynamo.config.patch(recompile_limit=1):
        first = CompiledDecoder.build(tiny_decoder(), cl(1, 3, 32, 32))
        second = CompiledDecoder.build(tiny_decoder(), cl(1, 3, 32, 64))  # a second entry of the same code
        assert first is not None and second is not None
        assert torch._dynamo.config.recompile_limit == 1  # the room was scoped to each build
        x = cl(1, 3, 32, 64)
        with torch.no_grad():
            torch.testing.assert_close(second(x), second.decoder(x), rtol=1e-4, atol=1e-3)
    assert second.fn is not None
    # so were Inductor's settings (weights frozen, C++ wrapper): nothing global stays flipped
    assert {k: getattr(inductor_config, k) for k in compiled_mod.OPTIONS} == inductor_before


def test_a_compiled_graph_that_fails_later_switches_to_eager(caplog):
    dec = tiny_decoder()
    c2 = CompiledDecoder(dec, None, cl(1, 3, 64, 96), 1.0)
    c2.fn = lambda x: (_ for _ in ()).throw(RuntimeError("guard failed: recompile limit\ndetails"))
    x = cl(1, 3, 64, 96)
    with caplog.at_level(logging.WARNING, logger="mobileyolo.backend"):
        out = c2(x)
    assert "compiled model failed (RuntimeError: guard failed: recompile limit); running eager" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(out, dec(x))
    assert c2.fn is None and torch.equal(c2(x), out)  # stays eager, no second warning needed
