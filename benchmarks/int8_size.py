"""Where the bytes of each INT8 export go, beside its float32 twin: why some miss 0.35x.

    python export.py --weights best.pt --include onnx openvino tflite executorch --int8 --data data/bccd.yaml
    python benchmarks/int8_size.py --weights best.pt

For each format whose float32 and INT8 files are both beside `weights` (export.py's names), prints the
two sizes, their ratio and the INT8 file split into parts:

- `int8 w`: the int8 weight values (1 byte per weight: 0.25x of their float32 bytes, the floor);
- `bias`: int32 or float32 biases (4 bytes per output channel, as in float32);
- `per-ch`: per-output-channel quantization tables (scales, zero points) the format's schema stores;
- `float`: other float constants (float head convs, decode grids, activation ranges);
- `graph`: the rest (graph description, names, alignment), which does not shrink with the weights.

The model's own counts (`weights`, `channels`: output channels of its convs) are printed first: a
depthwise conv has 9 or 25 weights per channel, so per-channel tables weigh more in MobileNetV3-Small
than in a dense network. Only reads files; nothing is exported or run.
"""
from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # script run: import from the repo root

from export import export_size

PARTS = ("int8 w", "bias", "per-ch", "float", "graph")


def onnx_parts(file: Path) -> Counter:
    """Bytes of a QDQ ONNX file by part (see the module docstring)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(file))
    readers: dict[str, list[tuple[str, int]]] = {}
    for node in model.graph.node:
        for k, x in enumerate(node.input):
            readers.setdefault(x, []).append((node.op_type, k))
    parts: Counter = Counter()
    for t in model.graph.initializer:
        a = numpy_helper.to_array(t)
        op, k = (readers.get(t.name) or [("", -1)])[0]
        if a.dtype == np.int8 and k == 0:
            parts["int8 w"] += a.nbytes
        elif a.dtype == np.int32 and k == 0:
            parts["bias"] += a.nbytes
        elif op in ("DequantizeLinear", "QuantizeLinear") and a.size > 1:
            parts["per-ch"] += a.nbytes
        else:
            parts["float"] += a.nbytes
    return parts


def tflite_parts(file: Path) -> Counter:
    """Bytes of a TFLite file by part; per-channel tables are scale (float32) and zero point (int64)."""
    from ai_edge_litert.tools import flatbuffer_utils as fb

    model = fb.read_model_from_bytearray(bytearray(file.read_bytes()))
    kind = {9: "int8 w", 2: "bias"}  # TensorType INT8, INT32
    parts: Counter = Counter()
    for graph in model.subgraphs:
        for t in graph.tensors:
            data = model.buffers[t.buffer].data
            if data is not None:
                parts[kind.get(t.type, "float")] += len(data)
            q = t.quantization
            if q is not None and q.scale is not None and len(q.scale) > 1:
                parts["per-ch"] += 4 * len(q.scale) + 8 * len(q.zeroPoint if q.zeroPoint is not None else [])
    return parts


def openvino_parts(folder: Path) -> Counter:
    """Bytes of an OpenVINO IR folder by part: i8 constants, f32 constants (scales, biases, ranges,
    float head: one part, `float`), and the XML plus metadata as `graph`."""
    parts: Counter = Counter()
    for xml in folder.glob("*.xml"):
        for etype, size in re.findall(r'element_type="(\w+)"[^>]*size="(\d+)"', xml.read_text()):
            parts["int8 w" if etype in ("i8", "u8") else "float"] += int(size)
    return parts


def executorch_parts(file: Path) -> Counter:
    """Bytes of an XNNPACK `.pte` by part: its named tensors (weights and biases: `int8 w` + `bias`
    together, reported under `int8 w`), their `scale_*` tables, and the rest (delegate graphs, keys)."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    named = deserialize_pte_binary(file.read_bytes()).named_data
    parts: Counter = Counter()
    for key, entry in named.pte_data.items():
        parts["per-ch" if key.startswith("scale") else "int8 w"] += len(named.buffers[entry.buffer_index])
    return parts


FILES = {  # format: (float32 name, INT8 name, parts of the INT8 file), names as export.py writes them
    "onnx": ("{s}.onnx", "{s}-int8.onnx", onnx_parts),
    "openvino": ("{s}_openvino_model", "{s}_int8_openvino_model", openvino_parts),
    "tflite": ("{s}_float32.tflite", "{s}_int8.tflite", tflite_parts),
    "executorch": ("{s}.pte", "{s}_int8.pte", executorch_parts),
}


def model_counts(weights: Path) -> tuple[int, int]:
    """(conv and linear weights, their output channels) of the model in checkpoint `weights`."""
    from models.checkpoint import load_checkpoint, model_from_checkpoint

    n_w = n_c = 0
    for m in model_from_checkpoint(load_checkpoint(weights)).modules():
        w = getattr(m, "weight", None)
        if w is not None and w.ndim in (2, 4):
            n_w, n_c = n_w + w.numel(), n_c + w.shape[0]
    return n_w, n_c


def run(weights: str | Path, folder: str | Path | None = None) -> list[tuple[str, int, int, Counter]]:
    """One (format, float32 bytes, INT8 bytes, INT8 parts) per format found in `folder` (default: beside
    `weights`) under export.py's names for `weights`; prints them."""
    weights = Path(weights)
    folder = Path(folder or weights.parent)
    n_w, n_c = model_counts(weights)
    print(f"{weights}: {n_w:,} weights, {n_c:,} output channels ({n_w / n_c:.1f} weights per channel)")
    head = f"{'format':<11}{'float32':>10}{'INT8':>10}{'ratio':>7}" + "".join(f"{p:>9}" for p in PARTS)
    print(head + "   (INT8 parts in kB; ratio = INT8 / float32)")
    rows = []
    for fmt, (fp, q, parts_of) in FILES.items():
        fp, q = folder / fp.format(s=weights.stem), folder / q.format(s=weights.stem)
        if not (fp.exists() and q.exists()):
            continue
        f_size, q_size, parts = export_size(fp), export_size(q), parts_of(q)
        parts["graph"] = q_size - sum(parts.values())
        rows.append((fmt, f_size, q_size, parts))
        print(f"{fmt:<11}{f_size / 1e3:>9.0f}k{q_size / 1e3:>9.0f}k{q_size / f_size:>7.3f}"
              + "".join(f"{parts[p] / 1e3:>9.1f}" for p in PARTS))
    if not rows:
        print(f"no float32/INT8 pairs of {weights.name} in {folder}: run export.py --int8 first")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="the exported checkpoint")
    parser.add_argument("--dir", default=None, help="folder of the exports (default: the checkpoint's)")
    args = parser.parse_args(argv)
    run(args.weights, args.dir)


if __name__ == "__main__":
    main()
