"""ONNX Runtime static INT8 quantization of our float ONNX export: `best-int8.onnx` (QDQ, per-channel).

Activations are unsigned 8-bit and weights signed per output channel (U8S8, the form x86 VNNI kernels
run), with MinMax calibration over `utils.export.calibrate` batches. Weights use 7 bits (`reduce_range`,
-64..64): without VNNI, ONNX Runtime's x86 kernels add u8 x s8 products in pairs into int16
(VPMADDUBSW), which saturates at 255 * 127 * 2; with 8-bit weights that clipped up to 5% of the stem
conv's pairs on BCCD images (`benchmarks/u8s8_saturation.py`). 7 bits cannot saturate and cost no
mAP50-95 here (docs/PERFORMANCE.md).

The decode (everything after the head's last convs) always stays float: quantizing it costs about 0.2
mAP50. With `keep_head_float` the head's 1x1 convs stay float too. Both are found from the graph's
structure, not node names: a node from which no Conv is reachable is decode; a Conv from which no other
Conv is reachable is a head conv.

The quantized graph is then compacted (`compact_qdq`): the quantizer's long tensor and node names and
the all-zero zero points of the weight and bias DequantizeLinear nodes were a quarter of the file, and
neither changes what ONNX Runtime computes or fuses (the same QLinearConv graph, outputs equal). The
float constants outside the quantized part (the float head convs' weights, the decode's grids) are
stored as float16 and cast back to float32 when the session loads, so they still run in float32.
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


def _short(i: int) -> str:
    """`i` in base 36: the shortest unique names for `compact_qdq`."""
    digits, out = "0123456789abcdefghijklmnopqrstuvwxyz", ""
    while True:
        i, r = divmod(i, 36)
        out = digits[r] + out
        if not i:
            return out


HALF_MIN = 1024  # smaller float constants are not worth a Cast node


def _halve_float_constants(graph: onnx.GraphProto) -> None:  # noqa: F821
    """Store large float32 initializers read only by float nodes as float16 + Cast (see `compact_qdq`)."""
    import onnx
    from onnx import numpy_helper

    readers: dict[str, set[str]] = {}
    for node in graph.node:
        for x in node.input:
            readers.setdefault(x, set()).add(node.op_type)
    casts = []
    for t in list(graph.initializer):
        ops = readers.get(t.name, set())
        if (t.data_type != onnx.TensorProto.FLOAT or not ops or ops & {"QuantizeLinear", "DequantizeLinear"}
                or int(np.prod(t.dims)) < HALF_MIN):
            continue
        half = numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name + "/f16")
        t.CopyFrom(half)
        casts.append(onnx.helper.make_node("Cast", [half.name], [half.name.removesuffix("/f16")],
                                           to=onnx.TensorProto.FLOAT))
    nodes = casts + list(graph.node)  # a Cast reads only an initializer: first is topological order
    del graph.node[:]
    graph.node.extend(nodes)


def compact_qdq(model: onnx.ModelProto) -> onnx.ModelProto:  # noqa: F821
    """Shrink a QDQ model in place (and return it) without changing what it computes.

    - DequantizeLinear of a constant (weights: int8, biases: int32) whose zero point is all zeros drops
      that optional input (ONNX's default zero point is 0 of the input's type).
    - Every tensor and node gets a short base-36 name; the graph's inputs and outputs keep theirs.
    - Float32 constants of `HALF_MIN` or more elements that feed float nodes (not Quantize/Dequantize)
      are stored as float16 behind a Cast to float32, which ONNX Runtime folds at load: the head convs'
      weights round to float16 (relative error <= 2**-11); the grids' whole and half numbers are exact.
    - Shape annotations (`value_info`) are dropped; runtimes infer them again.
    """
    from onnx import numpy_helper

    graph = model.graph
    init = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if (node.op_type == "DequantizeLinear" and len(node.input) == 3 and node.input[0] in init
                and node.input[2] in init):
            zp = numpy_helper.to_array(init[node.input[2]])
            if zp.dtype in (np.int8, np.int32) and not zp.any():
                del node.input[2]
    _halve_float_constants(graph)
    used = {x for node in graph.node for x in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    fixed = {v.name for v in [*graph.input, *graph.output]}
    names: dict[str, str] = {}

    def rename(x: str) -> str:
        if x and x not in fixed and x not in names:
            names[x] = _short(len(names))
        return names.get(x, x)

    for t in graph.initializer:
        t.name = rename(t.name)
    for i, node in enumerate(graph.node):
        node.name = _short(i)
        for k, x in enumerate(node.input):
            node.input[k] = rename(x)
        for k, x in enumerate(node.output):
            node.output[k] = rename(x)
    del graph.value_info[:]
    return model


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
                        reduce_range=True,
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
        q = compact_qdq(onnx.load(str(out)))
        del q.metadata_props[:]
        for k, v in meta.items():
            e = q.metadata_props.add()
            e.key, e.value = k, v
        onnx.save(q, str(out))
        os.replace(out, dst)
    return dst
