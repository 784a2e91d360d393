"""benchmarks/u8s8_saturation.py: int16 pair sums that leave range are counted, 7-bit weights never do."""
from __future__ import annotations

import cv2
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from utils.data.synthetic import make_synthetic_dataset


def _qdq_conv(tmp_path, weight: int):
    """x -> Q/DQ (uint8, 1/255) -> Conv with int8 weights all `weight` (3 -> 1 channel, 1x1) -> y."""
    inits = [numpy_helper.from_array(np.float32(1 / 255), "s"), numpy_helper.from_array(np.uint8(0), "z"),
             numpy_helper.from_array(np.full((1, 3, 1, 1), weight, np.int8), "wq"),
             numpy_helper.from_array(np.float32(0.01), "ws"), numpy_helper.from_array(np.int8(0), "wz")]
    nodes = [helper.make_node("QuantizeLinear", ["images", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["x"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"]),
             helper.make_node("Conv", ["x", "w"], ["y"], name="stem")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 64, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 64, 64])], inits)
    path = tmp_path / f"w{weight}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_saturation_is_counted_and_seven_bits_cannot_saturate(tmp_path, capsys):
    from benchmarks import u8s8_saturation

    data = make_synthetic_dataset(tmp_path / "data", n_train=2, n_val=1, imgsz=64)
    for f in (tmp_path / "data" / "images" / "train").iterdir():
        img = cv2.imread(str(f))
        img[:32] = 255  # white top half: 255 * 127 * 2 leaves int16; the rest stays below
        cv2.imwrite(str(f), img)
    stats = u8s8_saturation.run(_qdq_conv(tmp_path, 127), data, imgsz=64, images=2)
    (n_sat, n, err), = stats.values()
    assert n_sat > 0 and n % 2 == 0 and 0 < err < 1  # K = 3 is padded to 4: two pairs per pixel
    assert "1 quantized non-depthwise convs" in capsys.readouterr().out
    (n_sat, n, err), = u8s8_saturation.run(_qdq_conv(tmp_path, 64), data, imgsz=64, images=2).values()
    assert n_sat == 0 and n > 0 and err == 0.0  # 255 * 64 * 2 = 32640 fits
