"""CPU latency of the three inference formats through `DetectBackend` (model + decode, batch 1).

For each model YAML: random weights saved as a checkpoint, exported with export.py's code to ONNX and
TorchScript, then `.pt` (fused, channels_last), `.torchscript` and `.onnx` (ONNX Runtime, ORT_ENABLE_ALL)
are timed round-robin on the same input so load changes hit all formats alike, under the runtime policy
detect.py's `main()` applies (`utils.infer.runtime.apply_policy`). Prints median ms.
Numbers on a shared machine are noisy; compare formats within one run only.

    python benchmarks/backends.py --cfg models/mobilenetv3-small-yolo.yaml models/yolov5n.yaml --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # script run: import from the repo root

from utils.infer.backend import DetectBackend  # noqa: E402
from utils.infer.runtime import apply_policy  # noqa: E402

FORMATS = ("pt", "torchscript", "onnx")


def bench(cfg: str | Path, imgsz: int = 320, runs: int = 30, threads: int = 1) -> dict[str, float]:
    """Median ms per format for one model YAML (see the module docstring)."""
    import export
    from models.yolo import Model
    from models.checkpoint import save_checkpoint

    with tempfile.TemporaryDirectory() as d:
        m = Model(cfg, nc=3)
        pt = Path(d) / f"{Path(cfg).stem}.pt"
        save_checkpoint({"model": m.state_dict(), "ema": None, "yaml": m.yaml, "names": ["a", "b", "c"],
                         "stride": m.stride, "args": {"imgsz": imgsz}}, pt)
        files = {"pt": pt, **export.run(pt, ("onnx", "torchscript"), imgsz=imgsz, threads=threads)}
        policy = apply_policy(threads)  # as detect.py's main(): torch threads, allocator, ORT spin-waiting
        torch.set_num_threads(threads)  # under the policy's off switch too: every format on `threads`
        backends = {f: DetectBackend(files[f], threads=threads, spin=policy.spin) for f in FORMATS}
        x = torch.rand(1, 3, imgsz, imgsz)
        for b in backends.values():  # warm-up: lazy init, JIT profiling runs, ORT arena
            for _ in range(3):
                b(x)
        times: dict[str, list[float]] = {f: [] for f in FORMATS}
        for _ in range(runs):
            for f, b in backends.items():
                t = time.perf_counter()
                b(x)
                times[f].append((time.perf_counter() - t) * 1e3)
    return {f: statistics.median(v) for f, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Latency of .pt / .torchscript / .onnx through DetectBackend.")
    p.add_argument("--cfg", nargs="+", default=["models/mobilenetv3-small-yolo.yaml", "models/yolov5n.yaml"])
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads for every format")
    a = p.parse_args(argv)
    rows = [(Path(c).stem, bench(c, a.imgsz, a.runs, a.threads)) for c in a.cfg]
    print(f"\nbatch 1, {a.imgsz}x{a.imgsz}, {a.threads} thread(s), median of {a.runs} runs (ms):")
    print(f"{'model':32s}" + "".join(f"{f:>13s}" for f in FORMATS))
    for name, r in rows:
        print(f"{name:32s}" + "".join(f"{r[f]:13.1f}" for f in FORMATS))


if __name__ == "__main__":
    main()
