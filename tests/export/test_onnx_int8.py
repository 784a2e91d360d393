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
from utils.export.onnx_int8 import float_tail
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
    tail = set(float_tail(onnx.load(str(files["onnx"]))))
    assert len(tail) > 5
    inits = {t.name for t in model.graph.initializer}
    for n in model.graph.node:  # head convs keep float weights; the decode reads float tensors only
        if n.name in tail and n.op_type == "Conv":
            assert n.input[1] in inits, n.name
        elif n.name in tail:
            assert all(produced_by.get(i) != "DequantizeLinear" for i in n.input), n.name
    out = capsys.readouterr().out
    assert "INT8 check on" in out and "best-int8.onnx" in out and "best.onnx" in out


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
