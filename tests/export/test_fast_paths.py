"""The CPU fast paths: packed oneDNN convs (utils/packed_conv.py) and the ONNX layout passes
(utils/export/graph.py). Each must give the same numbers as the plain path, and fall back cleanly."""
from __future__ import annotations

import io
import logging
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from models.mobilenetv3 import SELayer
from models.yolo import Model
from utils import packed_conv
from utils.ops.decode import Decoder
from utils.export.graph import _StaticSE, sigmoid_first, static_se
from utils.packed_conv import MATMUL_MAX_ROWS, MatmulConvAct, PackedConvAct, pack_convs

SMALL, NANO = "models/mobilenetv3-small-yolo.yaml", "models/yolov5n.yaml"


def fused(cfg: str, nc: int = 3) -> Model:
    torch.manual_seed(0)
    m = Model(cfg, nc=nc).fuse().eval().to(memory_format=torch.channels_last)
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def cl(*shape: int) -> torch.Tensor:
    return torch.rand(*shape).contiguous(memory_format=torch.channels_last)


# ---- packed convs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [SMALL, NANO])
def test_packed_convs_match_eager_at_any_size(cfg):
    m = fused(cfg)
    x, other = cl(1, 3, 128, 128), cl(2, 3, 96, 160)  # packed at one size, run at another too
    with torch.inference_mode():
        ref, ref_other = m(x), m(other)
        n = pack_convs(m, x)
        out, out_other = m(x), m(other)
    convs = sum(isinstance(mod, nn.Conv2d) for mod in m.modules())
    packed = sum(isinstance(mod, PackedConvAct) for mod in m.modules())
    matmul = sum(isinstance(mod, MatmulConvAct) for mod in m.modules())
    assert packed > 0 and matmul > 0 and n == packed + matmul  # at 128 px every 1x1 map is small: matmul
    assert convs == 2 * sum(isinstance(mod, SELayer) for mod in m.modules()) + 3  # SE's and Detect's stay eager
    for a, b in zip(ref + ref_other, out + out_other):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("act", [nn.Identity(), nn.ReLU(), nn.Hardswish(), nn.SiLU()])
def test_matmul_conv_matches_the_conv(act):
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 20, 1).eval()
    mm = MatmulConvAct(conv, act)
    for x in (cl(1, 12, 5, 7), cl(3, 12, 4, 4), torch.rand(2, 12, 3, 6)):  # NCHW input is made NHWC
        with torch.inference_mode():
            y = mm(x)
            torch.testing.assert_close(y, act(conv(x)), rtol=1e-5, atol=1e-5)
        assert y.shape == (x.shape[0], 20, *x.shape[2:]) and y.is_contiguous(memory_format=torch.channels_last)
    for bad in (nn.Conv2d(12, 20, 3, padding=1), nn.Conv2d(12, 20, 1, stride=2), nn.Conv2d(12, 20, 1, groups=4),
                nn.Conv2d(12, 20, 1, bias=False)):
        with pytest.raises(ValueError, match="1x1"):
            MatmulConvAct(bad, act)


def test_matmul_only_below_the_row_limit():
    m = fused(SMALL)
    x = cl(1, 3, 320, 320)  # row 2's 1x1 expand sees 80x80 = 6400 pixels > MATMUL_MAX_ROWS
    with torch.inference_mode():
        pack_convs(m, x)
    expand = m.layers[2].expand.conv
    assert 80 * 80 > MATMUL_MAX_ROWS and isinstance(expand, PackedConvAct)
    assert isinstance(m.layers[10].expand.conv, MatmulConvAct)  # the 10x10 map of the last block
    batched = fused(SMALL)
    with torch.inference_mode():
        assert pack_convs(batched, cl(2, 3, 64, 64)) > 0
    assert not any(isinstance(mod, MatmulConvAct) for mod in batched.modules())  # batches keep packed convs


def test_packing_skips_unfused_and_unsupported_convs():
    torch.manual_seed(0)
    m = Model(SMALL, nc=3).eval()  # BN not folded: nothing may be packed
    with torch.inference_mode():
        assert pack_convs(m, cl(1, 3, 64, 64)) == 0
    m = fused(SMALL)
    first = m.layers[0]
    first.act = nn.LeakyReLU(0.1)  # no oneDNN post-op for it here: that conv stays eager
    with torch.inference_mode():
        ref = m(cl(1, 3, 64, 64))
        n = pack_convs(m, cl(1, 3, 64, 64))
        out = m(cl(1, 3, 64, 64))
    assert n > 0 and isinstance(first.conv, nn.Conv2d) and isinstance(first.act, nn.LeakyReLU)
    assert len(out) == len(ref)


def test_packing_falls_back_when_the_ops_fail(monkeypatch, caplog):
    m = fused(SMALL)
    x = cl(1, 3, 64, 64)
    with torch.inference_mode():
        ref = m(x)

    def broken(self, x):
        raise RuntimeError("mkldnn: unsupported")

    monkeypatch.setattr(PackedConvAct, "forward", broken)
    with caplog.at_level(logging.WARNING, logger="mobileyolo.backend"), torch.inference_mode():
        assert pack_convs(m, x) == 0
        out = m(x)
    assert "eager path" in caplog.text
    assert not any(isinstance(mod, PackedConvAct) for mod in m.modules())  # restored
    for a, b in zip(ref, out):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    monkeypatch.setattr(packed_conv, "available", lambda: False)
    with torch.inference_mode():
        assert pack_convs(m, x) == 0


def test_packing_refuses_results_that_disagree(monkeypatch, caplog):
    m = fused(SMALL)
    x = cl(1, 3, 64, 64)
    real = PackedConvAct.forward
    monkeypatch.setattr(PackedConvAct, "forward", lambda self, x: real(self, x) + 1.0)  # a wrong kernel
    with caplog.at_level(logging.WARNING, logger="mobileyolo.backend"), torch.inference_mode():
        assert pack_convs(m, x) == 0
    assert "disagree" in caplog.text
    assert not any(isinstance(mod, PackedConvAct) for mod in m.modules())


def test_packed_conv_rejects_unbiased_convs():
    with pytest.raises(ValueError, match="biased"):
        PackedConvAct(nn.Conv2d(8, 8, 3, padding=1, bias=False), "relu", [1, 8, 16, 16])


# ---- ONNX layout passes -----------------------------------------------------------------------------
def test_static_se_is_exact_and_leaves_the_original_alone():
    wrapper = Decoder(fused(SMALL, nc=80)).eval()
    x = torch.rand(1, 3, 160, 160)
    copy_ = static_se(wrapper)
    n_se = sum(isinstance(m, SELayer) for m in wrapper.modules())
    assert n_se == 9  # MobileNetV3-Small's SE blocks
    assert sum(isinstance(m, _StaticSE) for m in copy_.modules()) == n_se
    assert not any(isinstance(m, _StaticSE) for m in wrapper.modules())
    with torch.inference_mode():
        torch.testing.assert_close(copy_(x), wrapper(x), rtol=0, atol=0)


def _export(module: nn.Module, size: int = 128) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.zeros(1, 3, size, size),), buf, opset_version=17, dynamo=False,
                          input_names=["images"], output_names=["output0"])
    return onnx.load_from_string(buf.getvalue())


def _ort_reorders(model: onnx.ModelProto, tmp_path, name: str) -> tuple[int, np.ndarray]:
    """(ReorderOutput nodes in ONNX Runtime's optimized graph, output on a fixed input)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    opts.optimized_model_filepath = str(tmp_path / f"{name}.opt.onnx")
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((1, 3, 128, 128), dtype=np.float32)
    out = sess.run(None, {"images": x})[0]
    opt = onnx.load(str(tmp_path / f"{name}.opt.onnx"))
    return sum(n.op_type == "ReorderOutput" for n in opt.graph.node), out


def test_layout_passes_cut_ort_reorders_and_keep_outputs(tmp_path):
    wrapper = Decoder(fused(SMALL, nc=80)).eval()
    plain = _export(wrapper)
    tuned = _export(static_se(wrapper))
    resizes = [sum(n.op_type == "Resize" for n in m.graph.node) for m in (plain, tuned)]
    assert resizes[1] - resizes[0] == 9  # one per SE block (the neck's two upsamples are in both)
    assert sigmoid_first(tuned) == 3  # one per head level
    onnx.checker.check_model(tuned)
    r_plain, out_plain = _ort_reorders(plain, tmp_path, "plain")
    r_tuned, out_tuned = _ort_reorders(tuned, tmp_path, "tuned")
    np.testing.assert_allclose(out_tuned, out_plain, rtol=1e-5, atol=1e-4)
    if r_plain:  # ONNX Runtime used its blocked layout on this CPU (AVX2 or better)
        assert r_tuned < r_plain and r_tuned <= 3  # what is left: one back to NCHW per head level
        ops = [n.op_type for n in onnx.load(str(tmp_path / "tuned.opt.onnx")).graph.node]
        # the heads' sigmoids fused into their convs; one transpose per level (in utils/decode's
        # planes form of _decode_traceable, the decode's permute and the head's cancel out)
        assert "Sigmoid" not in ops and ops.count("Transpose") == 3



def test_export_applies_the_layout_passes_it_is_asked_for(tmp_path):
    from utils.export.metadata import export_metadata
    from utils.export.exporters import export_onnx

    wrapper = Decoder(fused(SMALL)).eval()
    meta = export_metadata(["a", "b", "c"], [8.0, 16.0, 32.0], (64, 64), 1, False)
    x = torch.zeros(1, 3, 64, 64)
    graphs = {name: onnx.load(str(export_onnx(wrapper, x, tmp_path / f"{name}.onnx", meta, layout=passes)))
              for name, passes in (("all", None), ("plain", ()), ("se", ("static_se",)))}
    resizes = {k: sum(n.op_type == "Resize" for n in g.graph.node) for k, g in graphs.items()}
    assert resizes["all"] - resizes["plain"] == 9 and resizes["se"] == resizes["all"]  # one per SE block
    first_ops = {k: [n.op_type for n in g.graph.node if n.op_type in ("Sigmoid", "Reshape", "Transpose")][:3]
                 for k, g in graphs.items()}
    assert first_ops["all"][0] == "Sigmoid" and first_ops["plain"][0] == first_ops["se"][0] == "Reshape"
    with pytest.raises(ValueError, match="unknown layout pass.*'fold'"):
        export_onnx(wrapper, x, tmp_path / "bad.onnx", meta, layout=("static_se", "fold"))
    assert not (tmp_path / "bad.onnx").exists()

def _chain_model(extra_consumer: bool) -> onnx.ModelProto:
    """x [1, 6, 2, 2] -> Reshape [1, 2, 3, 2, 2] -> Transpose -> Sigmoid (-> y), optionally also Identity."""
    shape = numpy_helper.from_array(np.array([1, 2, 3, 2, 2], dtype=np.int64), "shape")
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]),
             helper.make_node("Transpose", ["r"], ["t"], perm=[0, 1, 3, 4, 2]),
             helper.make_node("Sigmoid", ["t"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 2, 2, 3])]
    if extra_consumer:
        nodes.append(helper.make_node("Identity", ["t"], ["t2"]))
        outputs.append(helper.make_tensor_value_info("t2", TensorProto.FLOAT, [1, 2, 2, 2, 3]))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 2, 2])],
                              outputs, [shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_sigmoid_first_reorders_only_private_chains():
    import onnxruntime as ort

    x = np.random.default_rng(1).standard_normal((1, 6, 2, 2)).astype(np.float32)

    def run(model):
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})

    model = _chain_model(extra_consumer=False)
    before = run(model)[0]
    assert sigmoid_first(model) == 1
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["Sigmoid", "Reshape", "Transpose"]
    np.testing.assert_array_equal(run(model)[0], before)
    shared = _chain_model(extra_consumer=True)  # the transposed map is used elsewhere: leave it
    assert sigmoid_first(shared) == 0
    assert [n.op_type for n in shared.graph.node] == ["Reshape", "Transpose", "Sigmoid", "Identity"]


def test_backend_packs_pt_weights_and_matches_the_eager_backend(tmp_path):
    from benchmarks.latency import checkpoint_for
    from utils.infer.backend import DetectBackend

    pt, _ = checkpoint_for(SMALL, tmp_path, nc=3)
    packed, eager = DetectBackend(pt, threads=1), DetectBackend(pt, threads=1, pack=False)
    assert packed.packed == 0  # packing waits for the first input's shape
    packed.warmup((256, 256))
    assert packed.packed > 0
    for shape in ((1, 3, 256, 256), (1, 3, 320, 320), (3, 3, 256, 192)):
        x = torch.rand(*shape)
        torch.testing.assert_close(packed(x), eager(x), rtol=1e-4, atol=1e-3)  # boxes in pixels
