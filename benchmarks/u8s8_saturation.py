"""How often an INT8 ONNX model's convs would saturate in ONNX Runtime's x86 U8S8 kernels without VNNI.

    python benchmarks/u8s8_saturation.py --weights best-int8.onnx --data data/bccd.yaml --imgsz 320

On x86 CPUs without VNNI (AVX2, AVX-512 before Cascade Lake), ONNX Runtime's U8S8 GEMM multiplies uint8
activations by int8 weights with VPMADDUBSW, which adds adjacent products in pairs into int16 and clips
the sum at +-32767 (ONNX Runtime's quantization docs). This script emulates that step: it runs the QDQ
model on `--images` letterboxed train images, takes the uint8 input of every quantized non-depthwise
Conv, lays it out as the GEMM's K dimension (channel, kernel row, kernel column; pairs are neighbours
along K) and counts the pairs whose sum leaves int16, with the error clipping makes relative to the
largest accumulator of that conv. Depthwise convs run another kernel and are skipped. It is an
emulation on this machine, not a run on such a CPU: the K order of ONNX Runtime's packing may differ,
so read the counts as a measure of the risk. With 7-bit weights (export.py's default) no pair can
leave int16: 255 * 64 * 2 < 32767.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # script run: import from the repo root

from utils.export.calibrate import calibration_batches


def quantized_convs(model: onnx.ModelProto) -> list[tuple[object, str, np.ndarray]]:  # noqa: F821
    """(Conv node, name of its uint8 input, int8 weights [O, I, kh, kw]) of every non-depthwise Conv
    whose input and weights come from DequantizeLinear nodes."""
    from onnx import numpy_helper

    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    made_by = {o: n for n in model.graph.node for o in n.output}
    out = []
    for n in model.graph.node:
        if n.op_type != "Conv":
            continue
        x, w = made_by.get(n.input[0]), made_by.get(n.input[1])
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        if x is None or w is None or x.op_type != "DequantizeLinear" or w.op_type != "DequantizeLinear" or group != 1:
            continue
        if w.input[0] in init and init[w.input[0]].dtype == np.int8 and x.input[0] in made_by:
            out.append((n, made_by[x.input[0]].output[0], init[w.input[0]]))
    return out


def pair_sums(a: np.ndarray, w: np.ndarray, node: object, max_pixels: int = 400) -> np.ndarray:
    """int32 pair sums `[O, K/2, P]` of uint8 input `a` `[1, C, H, W]` and int8 weights `w` for up to
    `max_pixels` output pixels of conv `node` (strides, pads; zero padding)."""
    from onnx import helper

    att = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    (sh, sw), pads = att.get("strides", [1, 1]), att.get("pads", [0, 0, 0, 0])
    kh, kw = w.shape[2:]
    ap = np.pad(a.astype(np.int32), ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    ho, wo = (ap.shape[2] - kh) // sh + 1, (ap.shape[3] - kw) // sw + 1
    cols = np.stack([ap[0, :, i:i + sh * ho:sh, j:j + sw * wo:sw] for i in range(kh) for j in range(kw)], 1)
    cols = cols.reshape(-1, ho * wo)[:, ::max(1, ho * wo // max_pixels)]  # K = (c, kh, kw) rows
    wk = w.reshape(w.shape[0], -1).astype(np.int32)
    if cols.shape[0] % 2:  # an odd K is padded with a zero row, as a packed GEMM pads it
        cols, wk = np.vstack([cols, np.zeros_like(cols[:1])]), np.hstack([wk, np.zeros_like(wk[:, :1])])
    return wk[:, 0::2, None] * cols[None, 0::2] + wk[:, 1::2, None] * cols[None, 1::2]


def run(weights: str | Path, data: str | Path, imgsz: int = 320, images: int = 4) -> dict[str, tuple[int, int, float]]:
    """{conv node name: (saturating pairs, pairs, worst |clipped - exact| / max |accumulator|)} summed over
    `images` calibration images; prints the total and the worst convs."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(weights))
    convs = quantized_convs(model)
    for _, name, _ in convs:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.UINT8, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep the Q/DQ tensors
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    stats: dict[str, tuple[int, int, float]] = {}
    for batch in calibration_batches(data, (imgsz, imgsz), n=images, batch=1):
        outs = dict(zip(names, session.run(None, {session.get_inputs()[0].name: batch})))
        for node, name, w in convs:
            ps = pair_sums(outs[name], w, node)
            clipped = np.clip(ps, -32768, 32767)
            err = float(np.abs(ps.sum(1) - clipped.sum(1)).max() / (np.abs(ps.sum(1)).max() + 1))
            n_sat, n, worst = stats.get(node.name, (0, 0, 0.0))
            stats[node.name] = (n_sat + int((ps != clipped).sum()), n + ps.size, max(worst, err))
    n_sat, n = sum(s[0] for s in stats.values()), sum(s[1] for s in stats.values())
    print(f"{weights}: {len(convs)} quantized non-depthwise convs, {n_sat} of {n} pairs leave int16 "
          f"({n_sat / max(n, 1):.2e})")
    for name, (s, k, e) in sorted(stats.items(), key=lambda kv: -kv[1][2])[:5]:
        if s:
            print(f"  conv {name}: {s} of {k} pairs; clipping error up to {e:.3f} of its largest accumulator")
    return stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="a QDQ INT8 ONNX file (export.py --int8: best-int8.onnx)")
    parser.add_argument("--data", required=True, help="data YAML: images from its train split")
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--images", type=int, default=4)
    args = parser.parse_args(argv)
    run(args.weights, args.data, args.imgsz, args.images)


if __name__ == "__main__":
    main()
