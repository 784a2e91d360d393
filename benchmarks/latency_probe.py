"""Quick CPU latency probe: batch-1 median latency of model YAMLs in PyTorch and ONNX Runtime.

PyTorch path: fused, eval, channels_last, inference_mode. ONNX path: torch.onnx.export (dynamo=False,
opset 17) of the fused model, onnxruntime with `intra_op_num_threads=threads`. Prints ms and the
ratio to the first config. Ratios are only meaningful inside one run (shared, noisy CPUs).
Usage: python benchmarks/latency_probe.py --cfg models/yolov5n.yaml models/mobilenetv3-small-yolo.yaml
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import torch

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # script run: import from the repo root

from models.yolo import Model  # noqa: E402


def _median_ms(fn, runs: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def time_torch(model: Model, imgsz: int, runs: int) -> float:
    """Median ms of a fused, channels_last, inference_mode forward at batch 1."""
    m = model.eval().to(memory_format=torch.channels_last)
    x = torch.rand(1, 3, imgsz, imgsz).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        return _median_ms(lambda: m(x), runs)


def time_onnx(model: Model, imgsz: int, runs: int, threads: int) -> float:
    """Median ms of onnxruntime (CPU, `threads` intra-op threads) on the exported raw-map graph."""
    import onnxruntime as ort

    x = torch.rand(1, 3, imgsz, imgsz)
    buf = io.BytesIO()
    torch.onnx.export(model.eval().to(memory_format=torch.contiguous_format), (x,), buf,
                      opset_version=17, dynamo=False, input_names=["images"])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
    feed = {"images": x.numpy()}
    return _median_ms(lambda: sess.run(None, feed), runs)


def run(cfgs: list[str], imgsz: int = 320, runs: int = 30, threads: int = 2, onnx: bool = True) -> list[dict]:
    """Time each config (first one is the reference) and print a table; returns the rows."""
    torch.set_num_threads(threads)
    rows = []
    for cfg in cfgs:
        model = Model(cfg).fuse().eval()
        params = sum(p.numel() for p in model.parameters())
        row = {"cfg": Path(cfg).stem, "params": params, "torch_ms": time_torch(model, imgsz, runs)}
        row["onnx_ms"] = time_onnx(model, imgsz, runs, threads) if onnx else float("nan")
        rows.append(row)
    ref = rows[0]
    print(f"imgsz {imgsz}, batch 1, {threads} threads, median of {runs} (noisy shared CPU: compare ratios)")
    print(f"{'config':<32}{'params':>10}{'torch ms':>10}{'x ref':>7}{'ort ms':>9}{'x ref':>7}")
    for r in rows:
        print(f"{r['cfg']:<32}{r['params']:>10,}{r['torch_ms']:>10.2f}{r['torch_ms'] / ref['torch_ms']:>7.2f}"
              f"{r['onnx_ms']:>9.2f}{r['onnx_ms'] / ref['onnx_ms']:>7.2f}")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cfg", nargs="+", default=["models/yolov5n.yaml", "models/mobilenetv3-small-yolo.yaml"])
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-onnx", action="store_true")
    a = p.parse_args()
    run(a.cfg, a.imgsz, a.runs, a.threads, not a.no_onnx)


if __name__ == "__main__":
    main()
