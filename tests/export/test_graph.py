"""The ONNX layout passes (utils/export/graph.py): each keeps the plain export's outputs and changes our
exported graph in the one way it promises. What ONNX Runtime's optimizer then makes of the graph (its
layout reorders, fused kernels) depends on the CPU and is measured by benchmarks/onnx_layout.py, not here."""
from __future__ import annotations

import io
import warnings
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from models.mobilenetv3 import SELayer
from models.yolo import Model
from utils.export.graph import _StaticSE, sigmoid_first, static_se
from utils.ops.decode import Decoder

SMALL = "models/mobilenetv3-small-yolo.yaml"


def fused(cfg: str, nc: int = 3) -> Model:
    torch.manual_seed(0)
    m = Model(cfg, nc=nc).fuse().eval().to(memory_format=torch.channels_last)
    for p in m.parameters():
        p.requires_grad_(False)
    return m


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


def _ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """`model`'s output on `x` in ONNX Runtime with every graph optimization on (as DetectBackend runs it)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"images": x})[0]


def test_layout_passes_keep_outputs_and_change_our_graph_as_documented():
    wrapper = Decoder(fused(SMALL, nc=80)).eval()
    plain, tuned = _export(wrapper), _export(static_se(wrapper))
    assert sigmoid_first(tuned) == 3  # one per head level
    onnx.checker.check_model(tuned, full_check=True)
    # outputs: the pass forms and the plain form agree with each other and with PyTorch
    x = np.random.default_rng(0).random((1, 3, 128, 128), dtype=np.float32)
    out_plain, out_tuned = _ort(plain, x), _ort(tuned, x)
    with torch.inference_mode():
        ref = wrapper(torch.from_numpy(x)).numpy()
    assert out_tuned.shape == out_plain.shape == ref.shape == (1, 3 * (16 ** 2 + 8 ** 2 + 4 ** 2), 85)
    np.testing.assert_allclose(out_tuned, out_plain, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out_tuned, ref, rtol=1e-4, atol=1e-3)
    # our graph: static_se resizes every SE gate to its map's size, so the gate's Mul multiplies equal shapes
    inferred = onnx.shape_inference.infer_shapes(tuned)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in (*inferred.graph.value_info, *inferred.graph.input)}
    producer = {o: n for n in tuned.graph.node for o in n.output}
    gates = [n for n in tuned.graph.node if n.op_type == "Mul"
             and any(i in producer and producer[i].op_type == "Resize" for i in n.input)]
    assert len(gates) == sum(isinstance(m, SELayer) for m in wrapper.modules()) == 9
    for mul in gates:
        a, b = (shapes[i] for i in mul.input)
        assert a == b and len(a) == 4 and min(a[2:]) > 1, (mul.name, a, b)
        resize = next(producer[i] for i in mul.input if producer[i].op_type == "Resize")
        assert producer[resize.input[0]].op_type == "HardSigmoid"  # the SE gate, resized
    plain_ops, tuned_ops = (Counter(n.op_type for n in m.graph.node) for m in (plain, tuned))
    assert tuned_ops["Resize"] - plain_ops["Resize"] == 9  # the neck's two upsamples are in both
    # sigmoid_first: each head's Sigmoid reads its Conv's output directly, ahead of the Reshape/Transpose
    sigmoids = [n for n in tuned.graph.node if n.op_type == "Sigmoid"]
    assert len(sigmoids) == plain_ops["Sigmoid"] == 3
    assert all(producer[s.input[0]].op_type == "Conv" for s in sigmoids)
    plain_producer = {o: n for n in plain.graph.node for o in n.output}
    assert all(plain_producer[n.input[0]].op_type == "Transpose" for n in plain.graph.node if n.op_type == "Sigmoid")


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
