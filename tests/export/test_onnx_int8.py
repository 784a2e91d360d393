"""ONNX Runtime INT8 (`best-int8.onnx`): calibration, float decode, the gate, --int8 flags, calibration errors."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import export
from tests.backend_helpers import make_checkpoint
from utils.core.errors import cli_main
from utils.data.synthetic import make_synthetic_dataset
from utils.export.calibrate import (
    CalibrationError,
    calibration_batches,
    calibration_files,
)
from utils.export.onnx_int8 import HALF_MIN, compact_qdq, float_tail
from utils.infer.backend import DetectBackend


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("d") / "data", n_train=5, n_val=2, imgsz=64)


def test_calibration_batches(data):
    files = calibration_files(data, 3)
    assert len(files) == 3 and len(set(files)) == 3 and all("train" in f for f in files)
    batches = calibration_batches(data, (64, 96), n=3, batch=2)
    assert [b.shape for b in batches] == [(2, 3, 64, 96)] * 2  # 3 images, the last batch filled up
    assert all(b.dtype == np.float32 and 0 <= b.min() and b.max() <= 1 for b in batches)
    assert np.allclose(batches[0][:, :, 0, 0], 114 / 255)  # letterbox padding, as inference pads
    with pytest.raises(CalibrationError, match="--calib-images must be >= 1"):
        calibration_files(data, 0)


@pytest.mark.slow
def test_int8_onnx_round_trip_and_gate(data, tmp_path, capsys):
    pt = make_checkpoint(tmp_path / "best.pt", imgsz=64, obj_logit=3.0)
    files = export.run(pt, include=["onnx"], imgsz=64, int8=True, data=data, calib_images=4)
    q = files["onnx-int8"]
    assert q.name == "best-int8.onnx" and files["onnx"].name == "best.onnx"
    b = DetectBackend(q)
    assert b.fmt == "onnx" and b.names == ["class0", "class1"] and b.imgsz == (64, 64)
    x = export.reference_batch((64, 64))
    ref = DetectBackend(pt)(x)
    y = b(x)
    assert y.shape == ref.shape and float((y[..., 4:] - ref[..., 4:]).abs().max()) < 0.2  # close, not equal
    model = onnx.load(str(q))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    produced_by = {o: n.op_type for n in model.graph.node for o in n.output}
    tail = set(float_tail(model))  # found from the structure: compact_qdq renamed every node
    assert len(tail) > 5
    head = [n for n in model.graph.node if n.name in tail and n.op_type == "Conv"]
    assert len(head) == len(b.strides)  # one 1x1 conv per level, with float weights (float16 + Cast if large)
    floats = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    assert all(produced_by.get(n.input[1]) == "Cast" or n.input[1] in floats for n in head)
    for n in model.graph.node:  # the decode reads float tensors only
        if n.name in tail and n.op_type != "Conv":
            assert all(produced_by.get(i) != "DequantizeLinear" for i in n.input), n.name
    weights = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert weights and all(np.abs(w.astype(int)).max() <= 64 for w in weights)  # 7 bits: no int16 pair saturation
    assert max(np.abs(w.astype(int)).max() for w in weights) == 64  # ... and the range is used
    assert len(q.read_bytes()) < 0.45 * len(files["onnx"].read_bytes())  # tiny model: graph overhead weighs more
    out = capsys.readouterr().out
    assert "INT8 check on" in out and "best-int8.onnx" in out and "best.onnx" in out
    assert f"where the bytes go: python benchmarks/int8_size.py --weights {pt}\n" in out  # tiny: over 0.35x


def test_float_tail_finds_decode_and_head():
    h = onnx.helper
    nodes = [h.make_node("Conv", ["x", "w"], ["a"], name="stem"), h.make_node("Relu", ["a"], ["b"], name="relu"),
             h.make_node("Conv", ["b", "w"], ["c"], name="head"), h.make_node("Sigmoid", ["c"], ["d"], name="sig"),
             h.make_node("Mul", ["d", "d"], ["y"], name="mul")]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 4, 4])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 1, 4, 4])],
                         [h.make_tensor("w", onnx.TensorProto.FLOAT, [1, 1, 1, 1], [1.0])])
    model = h.make_model(graph)
    assert float_tail(model) == ["head", "sig", "mul"]
    assert float_tail(model, keep_head_float=False) == ["sig", "mul"]


def test_int8_flag_errors(tmp_path, capsys):
    pt = make_checkpoint(tmp_path / "best.pt", imgsz=64)
    with pytest.raises(export.ExportError, match="--int8 needs --data"):
        export.run(pt, include=["onnx"], int8=True)
    with pytest.raises(export.ExportError, match="--int8: none of torchscript"):
        export.run(pt, include=["torchscript"], int8=True, data="x.yaml")
    assert cli_main("export.py", export.main, ["--weights", str(pt), "--int8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("export.py: error: --int8 needs --data")
    empty = tmp_path / "empty.yaml"
    (tmp_path / "imgs").mkdir()
    empty.write_text(f"path: {tmp_path}\ntrain: imgs\nval: imgs\nnames: [a]\n")
    with pytest.raises(CalibrationError, match="no images in the train split"):
        calibration_files(empty)


def _qdq_model() -> onnx.ModelProto:
    """x -> Q/DQ -> Conv(int8 weights, int32 bias, zero zero points) -> float Conv -> Add(grid) -> y,
    with the long names a quantizer writes; one weight zero point is non-zero and must stay."""
    h, T, rng = onnx.helper, onnx.TensorProto, np.random.default_rng(0)
    c = 64  # float conv weights (c * c) and grid (c * 16) have >= HALF_MIN elements: stored as float16
    inits = [
        onnx.numpy_helper.from_array(rng.integers(-127, 128, (c, 3, 1, 1), dtype=np.int8), "very/long/w_quantized"),
        onnx.numpy_helper.from_array(np.full(c, 0.01, np.float32), "very/long/w_scale"),
        onnx.numpy_helper.from_array(np.zeros(c, np.int8), "very/long/w_zero_point"),
        onnx.numpy_helper.from_array(rng.integers(-500, 500, c, dtype=np.int32), "very/long/b_quantized"),
        onnx.numpy_helper.from_array(np.full(c, 0.01 / 255, np.float32), "very/long/b_scale"),
        onnx.numpy_helper.from_array(np.zeros(c, np.int32), "very/long/b_zero_point"),
        onnx.numpy_helper.from_array(np.float32(1 / 255), "x_scale"),
        onnx.numpy_helper.from_array(np.uint8(3), "x_zero_point"),  # non-zero: kept
        onnx.numpy_helper.from_array(rng.standard_normal((c, c, 1, 1)).astype(np.float32), "head_weight"),
        onnx.numpy_helper.from_array(np.arange(c * 16, dtype=np.float32).reshape(1, c, 4, 4) - 0.5, "grid"),
    ]
    nodes = [h.make_node("QuantizeLinear", ["x", "x_scale", "x_zero_point"], ["xq"], name="x/quantize"),
             h.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero_point"], ["xd"], name="x/dequantize"),
             h.make_node("DequantizeLinear", ["very/long/w_quantized", "very/long/w_scale", "very/long/w_zero_point"],
                         ["w"], name="w/dequantize", axis=0),
             h.make_node("DequantizeLinear", ["very/long/b_quantized", "very/long/b_scale", "very/long/b_zero_point"],
                         ["b"], name="b/dequantize", axis=0),
             h.make_node("Conv", ["xd", "w", "b"], ["a"], name="/model/layers.0/conv/Conv"),
             h.make_node("Conv", ["a", "head_weight"], ["m"], name="/model/detect/m.0/Conv"),
             h.make_node("Add", ["m", "grid"], ["y"], name="/decode/Add")]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 4, 4])],
                         [h.make_tensor_value_info("y", T.FLOAT, [1, c, 4, 4])], inits)
    graph.value_info.append(h.make_tensor_value_info("a", T.FLOAT, [1, c, 4, 4]))
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


def test_compact_qdq_keeps_the_outputs_and_shrinks_the_file():
    import onnxruntime as ort

    model = _qdq_model()
    before = model.SerializeToString()
    small = compact_qdq(_qdq_model())
    onnx.checker.check_model(small)
    after = small.SerializeToString()
    assert len(after) < len(before)
    x = np.random.default_rng(1).random((1, 3, 4, 4), dtype=np.float32)
    ref = ort.InferenceSession(before, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    out = ort.InferenceSession(after, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(out - ref).max() <= 2 ** -10 * np.abs(ref).max()  # the head weights rounded to float16
    g = small.graph
    assert [i.name for i in g.input] == ["x"] and [o.name for o in g.output] == ["y"]
    assert all(len(n.name) <= 2 for n in g.node) and not g.value_info
    assert all(len(x) <= 2 for n in g.node for x in [*n.input, *n.output] if x not in ("x", "y"))
    dq = [n for n in g.node if n.op_type == "DequantizeLinear"]
    assert sorted(len(n.input) for n in dq) == [2, 2, 3]  # weights and bias lose the zeros; x keeps its 3
    init = {t.name: t for t in g.initializer}
    casts = [n for n in g.node if n.op_type == "Cast"]
    assert len(casts) == 2 and all(init[n.input[0]].data_type == onnx.TensorProto.FLOAT16 for n in casts)
    grid = onnx.numpy_helper.to_array(init[casts[1].input[0]]).astype(np.float32)
    assert np.array_equal(grid, np.arange(64 * 16, dtype=np.float32).reshape(1, 64, 4, 4) - 0.5)  # exact


def test_compact_qdq_keeps_non_zero_and_small_constants():
    model = _qdq_model()
    zp = next(t for t in model.graph.initializer if t.name == "very/long/w_zero_point")
    zp.CopyFrom(onnx.numpy_helper.from_array(np.ones(64, np.int8), zp.name))
    small = compact_qdq(model)
    w_dq = next(n for n in small.graph.node if n.op_type == "DequantizeLinear" and n.input[0] != small.graph.node[0].output[0]
                and len(n.input) == 3 and n.input[0] not in {o for m in small.graph.node for o in m.output})
    assert len(w_dq.input) == 3  # a non-zero weight zero point stays
    tiny = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Add", ["x", "c"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])],
        [onnx.numpy_helper.from_array(np.ones(HALF_MIN - 1, np.float32), "c")]))
    assert [n.op_type for n in compact_qdq(tiny).graph.node] == ["Add"]  # below HALF_MIN: no Cast
