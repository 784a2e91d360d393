"""Quick CPU latency probe: batch-1 median latency of model YAMLs in PyTorch and ONNX Runtime.

PyTorch path: fused, eval, channels_last, inference_mode. ONNX path: torch.onnx.export (dynamo=False,
opset 17) of the fused model, onnxruntime with `intra_op_num_threads=threads`. Prints ms and the
ratio to the first config. Models are timed round-robin (one call each per round), so load changes on
a shared CPU hit all of them alike; still, ratios are only meaningful inside one run.
Usage: python benchmarks/latency_probe.py --cfg models/yolov5n.yaml models/mobilenetv3-small-yolo.yaml
"""
from __future__ import annotations

import argparse
import copy
import io
import sys
import warnings
from pathlib import Path
from collections.abc import Callable

import torch

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # script run: import from the repo root

from models.yolo import Model  # noqa: E402


def _interleaved_medians(fns: list[Callable[[], object]], runs: int, warmup: int = 5) -> list[float]:
    """Median ms per callable, timed in interleaved rounds (see `benchmarks.latency.interleaved_medians`)."""
    from benchmarks.latency import interleaved_medians

    medians = interleaved_medians({str(i): fn for i, fn in enumerate(fns)}, runs, warmup)
    return [medians[str(i)] for i in range(len(fns))]


def torch_fn(model: Model, imgsz: int) -> Callable[[], object]:
    """Fused, eval, channels_last forward at batch 1 under inference_mode (detect.py's path)."""
    m = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)
    x = torch.rand(1, 3, imgsz, imgsz).contiguous(memory_format=torch.channels_last)

    def fn() -> object:
        with torch.inference_mode():
            return m(x)
    return fn


def onnx_fn(model: Model, imgsz: int, threads: int) -> Callable[[], object]:
    """onnxruntime CPU session (`threads` intra-op threads) on the exported raw-map graph."""
    import onnxruntime as ort

    x = torch.rand(1, 3, imgsz, imgsz)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (x,), buf, opset_version=17, dynamo=False, input_names=["images"])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
    feed = {"images": x.numpy()}
    return lambda: sess.run(None, feed)


def run(cfgs: list[str], imgsz: int = 320, runs: int = 30, threads: int = 2, onnx: bool = True) -> list[dict]:
    """Time each config (the first is the reference) in PyTorch and ORT; print and return rows."""
    torch.set_num_threads(threads)
    models = [Model(cfg).fuse().eval() for cfg in cfgs]
    rows = [{"cfg": Path(c).stem, "params": sum(p.numel() for p in m.parameters())} for c, m in zip(cfgs, models)]
    for r, ms in zip(rows, _interleaved_medians([torch_fn(m, imgsz) for m in models], runs)):
        r["torch_ms"] = ms
    ort_ms = _interleaved_medians([onnx_fn(m, imgsz, threads) for m in models], runs) if onnx else [float("nan")] * len(rows)
    for r, ms in zip(rows, ort_ms):
        r["onnx_ms"] = ms
    ref = rows[0]
    print(f"imgsz {imgsz}, batch 1, {threads} threads, median of {runs}, models interleaved "
          f"(shared CPU: compare ratios within one run)")
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
