"""What each change to our ONNX graphs buys in ONNX Runtime: latency per change, per model.

    python benchmarks/onnx_layout.py                               # yolov5n and MobileNetV3-Small, 320 px
    python benchmarks/onnx_layout.py --cfg models/mobilenetv3-large-yolo.yaml models/yolov5n.yaml --runs 100

Each `--cfg` (random weights, seed 0, BN fused) is exported at a fixed size, adding one change at a
time: the plain graph (decode row by row, no pass), + static_se, + sigmoid_first (the passes of
`utils.export.graph.LAYOUT_PASSES`), + planes decode (`utils.ops.decode._decode_traceable`) = what export.py
writes. Every file runs through `DetectBackend` (detect.py's ONNX Runtime session: `--threads`
intra-op threads, ORT_ENABLE_ALL, detect.py's runtime policy); all of them are timed in interleaved
rounds (benchmarks/latency.py) and each file's output is compared with the plain graph's. Prints the
median ms per model and graph, and the first model's latency over the second's per graph.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # script run: import from the repo root

DEFAULT_CFGS = ["models/mobilenetv3-small-yolo.yaml", "models/yolov5n.yaml"]


def arms() -> list[tuple[str, bool, tuple[str, ...]]]:
    """(label, planes decode?, layout passes) per graph: the plain graph (row-by-row decode, no pass),
    then one more of `LAYOUT_PASSES` each time, then the channel-major decode export.py writes."""
    from utils.export.graph import LAYOUT_PASSES

    rows = [(f"+ {p}", False, LAYOUT_PASSES[:i + 1]) for i, p in enumerate(LAYOUT_PASSES)]
    return [("plain", False, ()), *rows, ("+ planes decode", True, LAYOUT_PASSES)]


def _rows_decoder(model: torch.nn.Module) -> torch.nn.Module:
    """`Decoder` with the row-by-row decode in the ONNX graph too (what export wrote before planes)."""
    from utils.ops.decode import Decoder, _decode_traceable

    class RowsDecoder(Decoder):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            det = self.model.detect
            return _decode_traceable(self.model(x), det.anchors, det.stride, planes=False)

    return RowsDecoder(model)


def export_arms(cfg: str | Path, imgsz: int, folder: Path) -> dict[str, Path]:
    """{label: ONNX file} for every arm of `cfg` at `imgsz` (fixed size, batch 1) in `folder`."""
    from models.yolo import Model
    from utils.export.metadata import export_metadata
    from utils.ops.decode import Decoder
    from utils.export.exporters import export_onnx

    torch.manual_seed(0)
    model = Model(cfg).fuse().eval()
    wrappers = {True: Decoder(model).eval(), False: _rows_decoder(model).eval()}
    names = model.names or [str(i) for i in range(model.detect.nc)]
    meta = export_metadata(names, model.detect.stride.tolist(), (imgsz, imgsz), 1, False)
    x = torch.zeros(1, 3, imgsz, imgsz)
    files = {}
    for i, (label, planes, passes) in enumerate(arms()):
        files[label] = export_onnx(wrappers[planes], x, folder / f"{Path(cfg).stem}_{i}.onnx", meta, layout=passes)
    return files


def run(cfgs: list[str] | None = None, imgsz: int = 320, runs: int = 60, threads: int = 2) -> dict:
    """Time every (model, arm); print a table. Returns `{'ms': {(cfg stem, label): ms}, 'max_diff': {...},
    'ratio': {label: first model's ms / second's}}` (ratio only with two or more models)."""
    from benchmarks.latency import interleaved_medians
    from utils.infer.backend import DetectBackend
    from utils.infer.runtime import apply_policy

    cfgs = cfgs or DEFAULT_CFGS
    policy = apply_policy(threads)  # as detect.py's main(): allocator tuning, ORT spin-waiting only when idle
    x = torch.rand(1, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(0))
    fns, diffs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for cfg in cfgs:
            stem = Path(cfg).stem
            files = export_arms(cfg, imgsz, Path(tmp))
            backends = {label: DetectBackend(f, threads=threads, spin=policy.spin) for label, f in files.items()}
            ref = backends["plain"](x)
            for label, be in backends.items():
                diffs[(stem, label)] = float((be(x) - ref).abs().max())
                fns[(stem, label)] = (lambda b: lambda: b(x))(be)
        ms = interleaved_medians(fns, runs)
    labels = [a[0] for a in arms()]
    stems = [Path(c).stem for c in cfgs]
    print(f"ONNX Runtime, batch 1, {imgsz} px, {threads} threads, median ms of {runs} in interleaved rounds")
    print("| graph | " + " | ".join(stems) + (f" | {stems[0]} / {stems[1]} |" if len(stems) > 1 else " |"))
    print("|---|" + "---:|" * (len(stems) + (len(stems) > 1)))
    ratio = {}
    for label in labels:
        cells = [f"{ms[(s, label)]:.2f}" for s in stems]
        if len(stems) > 1:
            ratio[label] = ms[(stems[0], label)] / ms[(stems[1], label)]
            cells.append(f"{ratio[label]:.3f}")
        print(f"| {label} | " + " | ".join(cells) + " |")
    print(f"largest output difference from the plain graph: {max(diffs.values()):.2e}")
    return {"ms": ms, "max_diff": diffs, "ratio": ratio}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", nargs="+", default=DEFAULT_CFGS, help="model YAMLs (detectors)")
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--runs", type=int, default=60, help="timed runs per graph")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    a = p.parse_args(argv)
    if a.imgsz < 32 or a.imgsz % 32 or a.runs < 1 or a.threads < 1:
        p.error("--imgsz must be a multiple of 32, --runs and --threads >= 1")
    run(a.cfg, a.imgsz, a.runs, a.threads)


if __name__ == "__main__":
    main()
