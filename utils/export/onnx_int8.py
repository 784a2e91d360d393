"""ONNX Runtime static INT8 quantization of our float ONNX export: `best-int8.onnx` (QDQ, per-channel).

Activations are unsigned 8-bit and weights signed 8-bit per output channel (U8S8, the form x86 VNNI
kernels run), with MinMax calibration over `utils.export.calibrate` batches. The decode (everything after
the head's last convs) always stays float: quantizing it costs about 0.2 mAP50. With `keep_head_float`
the head's 1x1 convs stay float too. Both are found from the graph's structure, not node names: a node
from which no Conv is reachable is decode; a Conv from which no other Conv is reachable is a head conv.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np


def int8_onnx_path(weights: str | Path, outdir: str | Path | None = None) -> Path:
    """YOLOv5's name: `best-int8.onnx` beside the weights (or in `outdir`)."""
    return Path(outdir or Path(weights).parent) / f"{Path(weights).stem}-int8.onnx"


def float_tail(model: onnx.ModelProto, keep_head_float: bool = True) -> list[str]:  # noqa: F821
    """Names of the nodes to leave float: the decode after the last convs, plus those convs if asked."""
    consumers: dict[str, list[int]] = {}
    nodes = list(model.graph.node)
    for i, n in enumerate(nodes):
        for t in n.input:
            consumers.setdefault(t, []).append(i)
    conv_below: dict[int, bool] = {}  # node index -> whether a Conv is reachable downstream of its outputs

    def reaches_conv(i: int) -> bool:
        if i not in conv_below:
            conv_below[i] = False  # graphs are acyclic; this only guards the recursion
            nxt = [j for t in nodes[i].output for j in consumers.get(t, [])]
            conv_below[i] = any(nodes[j].op_type == "Conv" or reaches_conv(j) for j in nxt)
        return conv_below[i]

    names = []
    for i, n in enumerate(nodes):
        if reaches_conv(i):
            continue
        if n.op_type != "Conv" or keep_head_float:
            names.append(n.name)
    return names


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over a list of float32 batches."""

    def __init__(self, input_name: str, batches: list[np.ndarray]) -> None:
        self.input_name, self.batches = input_name, batches
        self._it: Iterator[np.ndarray] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        arr = next(self._it, None)
        return None if arr is None else {self.input_name: np.ascontiguousarray(arr, dtype=np.float32)}

    def rewind(self) -> None:
        self._it = iter(self.batches)


def quantize_onnx(src: str | Path, dst: str | Path, calib: list[np.ndarray], keep_head_float: bool = True) -> Path:
    """Write the static INT8 (QDQ, per-channel, U8S8) version of float export `src` to `dst`; returns `dst`.

    `calib`: float32 batches shaped like `src`'s input. The metadata of `src` is carried over. The file
    is written to a temp name and moved into place.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src))
    meta = {p.key: p.value for p in model.metadata_props}
    input_name = model.graph.input[0].name
    reader = type("Reader", (_Reader, CalibrationDataReader), {})(input_name, calib)
    with tempfile.TemporaryDirectory(prefix=".int8.", dir=dst.parent) as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)  # folds BN/shape ops, names nodes
        exclude = float_tail(onnx.load(str(pre)), keep_head_float)
        out = Path(tmp) / "int8.onnx"
        quantize_static(str(pre), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
        q = onnx.load(str(out))
        del q.metadata_props[:]
        for k, v in meta.items():
            e = q.metadata_props.add()
            e.key, e.value = k, v
        onnx.save(q, str(out))
        os.replace(out, dst)
    return dst
