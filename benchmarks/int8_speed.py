"""INT8 against float32 time in ONNX Runtime and OpenVINO, with each runtime's profile of what stays float.

    python benchmarks/int8_speed.py --cfg models/mobilenetv3-large-minimal-yolo.yaml \\
        models/mobilenetv3-small-minimal-yolo.yaml --imgsz 640 320 --data data/bccd.yaml --threads 2

For each YAML and size: a random-weight checkpoint (seed 0, nc of the data) is exported by export.py to
float32 ONNX and OpenVINO and to their INT8 forms (calibrated on `--calib-images` train images); all four
are timed at batch 1 in interleaved rounds (benchmarks/latency.py) and the INT8/float32 ratio is the median
over rounds of the paired ratio (25th-75th percentile beside it). `--profile` then runs each file with
its runtime's profiler and prints milliseconds per kernel kind: ONNX Runtime's node events per op type
(`SessionOptions.enable_profiling`; `QLinearConv` is integer, `Conv`/`FusedConv` float) and OpenVINO's
`PERF_COUNT` per exec type (`..._I8` integer, `..._FP32` float). Random weights time the same as
trained ones; for accuracy use export.py's INT8 check on a trained checkpoint.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # script run: import from the repo root

import export
from benchmarks.latency import checkpoint_for, interleaved_rounds, paired_ratio
from utils.data.data_yaml import check_dataset
from utils.infer.formats.onnxrt import ONNXRunner
from utils.infer.formats.openvino import OpenVINORunner

KINDS = ("onnx", "onnx-int8", "openvino", "openvino-int8")


def prepare(cfg: str | Path, imgsz: int, data: str | Path, folder: Path, calib_images: int) -> dict[str, Path]:
    """Float32 and INT8 ONNX and OpenVINO exports of a random-weight `cfg` at `imgsz` (export.py's output hidden)."""
    sub = folder / f"{Path(cfg).stem}-{imgsz}"
    sub.mkdir(parents=True, exist_ok=True)
    pt, _ = checkpoint_for(cfg, sub, nc=check_dataset(data).nc, imgsz=imgsz)
    with contextlib.redirect_stdout(io.StringIO()):
        return export.run(pt, ("onnx", "openvino"), imgsz=imgsz, int8=True, data=data, calib_images=calib_images,
                          gate=False, threads=1)


def runners(files: dict[str, Path], threads: int, profile_dir: Path | None = None) -> dict[str, object]:
    """One runner per kind (with its profiler on when `profile_dir` is given)."""
    out = {}
    for kind in KINDS:
        if kind.startswith("onnx"):
            prefix = str(profile_dir / kind) if profile_dir else None
            out[kind] = ONNXRunner(files[kind], threads, spin=True, profile=prefix)
        else:
            out[kind] = OpenVINORunner(files[kind], threads, profile=profile_dir is not None)
    return out


def ort_profile(runner: ONNXRunner, x: np.ndarray, calls: int = 20) -> dict[str, float]:
    """ms per call by op type from ONNX Runtime's profiler (node events)."""
    for _ in range(calls):
        runner(x)
    trace = json.loads(Path(runner.session.end_profiling()).read_text())
    per: dict[str, float] = defaultdict(float)
    for ev in trace:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            per[ev.get("args", {}).get("op_name", "?")] += ev["dur"] / 1e3 / calls
    return dict(sorted(per.items(), key=lambda kv: -kv[1]))


def ov_profile(runner: OpenVINORunner, x: np.ndarray, calls: int = 20) -> dict[str, float]:
    """ms per call by (layer type, exec type) from OpenVINO's PERF_COUNT."""
    per: dict[str, float] = defaultdict(float)
    for _ in range(calls):
        runner(x)
        for _, node_type, exec_type, ms in runner.profile_rows():
            if ms > 0:
                per[f"{node_type} [{exec_type}]"] += ms / calls
    return dict(sorted(per.items(), key=lambda kv: -kv[1]))


def bench(cfg: str | Path, imgsz: int, data: str | Path, folder: Path, runs: int, threads: int,
          calib_images: int, profile: bool) -> None:
    """Print the INT8/float32 ratios (and profiles) of one YAML at one size."""
    files = prepare(cfg, imgsz, data, folder, calib_images)
    x = export.reference_batch((imgsz, imgsz)).numpy()
    rs = runners(files, threads)
    rounds = interleaved_rounds({k: (lambda r=r: r(x)) for k, r in rs.items()}, runs, warmup=5,
                                desc=f"{Path(cfg).stem} {imgsz}")
    med = {k: float(np.median([t for r in v for t in r])) for k, v in rounds.items()}
    print(f"\n{Path(cfg).stem} @ {imgsz}, batch 1, {threads} threads, {runs} calls each (interleaved)")
    for rt in ("onnx", "openvino"):
        mid, lo, hi = paired_ratio(rounds[f"{rt}-int8"], rounds[rt])
        print(f"  {rt:<9} fp32 {med[rt]:7.2f} ms  int8 {med[rt + '-int8']:7.2f} ms  int8/fp32 {mid:.2f} "
              f"(IQR {lo:.2f}-{hi:.2f}); size {export.export_size(files[rt + '-int8']) / export.export_size(files[rt]):.2f}x")
    if profile:
        with tempfile.TemporaryDirectory() as tmp:
            prs = runners(files, threads, Path(tmp))
            for kind, r in prs.items():
                per = ort_profile(r, x) if kind.startswith("onnx") else ov_profile(r, x)
                top = ", ".join(f"{k} {v:.2f}" for k, v in list(per.items())[:8])
                print(f"  profile {kind:<14} total {sum(per.values()):6.2f} ms: {top}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cfg", nargs="+", default=["models/mobilenetv3-large-minimal-yolo.yaml",
                                                "models/mobilenetv3-small-minimal-yolo.yaml"])
    p.add_argument("--imgsz", nargs="+", type=int, default=[640, 320])
    p.add_argument("--data", default="data/bccd.yaml", help="calibration images (train split)")
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calib-images", type=int, default=32)
    p.add_argument("--no-profile", dest="profile", action="store_false")
    a = p.parse_args(argv)
    logging.getLogger("mobileyolo.export").setLevel(logging.ERROR)
    logging.getLogger("nncf").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="int8-speed-") as tmp:
        for cfg in a.cfg:
            for s in a.imgsz:
                bench(cfg, s, a.data, Path(tmp), a.runs, a.threads, a.calib_images, a.profile)


if __name__ == "__main__":
    main()
