"""detect.py's per-image path, stage by stage: read, letterbox, tensor, model, NMS, draw, encode.

Uses detect.py's own `Detector` (same weights loading, letterbox, tensor conversion, backend, NMS and
box scaling) and the same drawing and JPEG encoding its `ResultWriter` does, but times each stage of
each image separately. Prints/returns the median milliseconds per stage over all images.

    python benchmarks/detect_path.py --weights runs/train/exp/weights/best.pt
    python benchmarks/detect_path.py --cfg models/mobilenetv3-small-yolo.yaml   # random weights
"""
from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # script run: import from the repo root

STAGES = ("read", "letterbox", "tensor", "model", "nms", "draw", "encode")
# The stages the target covers ("no stage costs more than the model"); `encode` (writing the
# annotated JPEG) is reported too but only happens when images are saved.
CHECKED = ("read", "letterbox", "tensor", "nms", "draw")


@dataclass
class PathResult:
    """Median ms per stage (`ms`, keys `STAGES` plus `total`), images timed, detections per image."""

    ms: dict[str, float]
    images: int
    dets_per_image: float
    weights: str
    fmt: str
    imgsz: tuple[int, int]


def run(weights: str | Path | None = None, cfg: str | Path = "models/mobilenetv3-small-yolo.yaml",
        source: str | Path | None = None, imgsz: int = 320, threads: int | None = 2, passes: int = 1,
        warmup: int = 3, conf_thres: float = 0.25, fmt: str = "pt") -> PathResult:
    """Time detect.py's stages on every image of `source` (default: the bundled BCCD val images).

    `weights`: a .pt/.onnx/.torchscript file; None builds `cfg` with random weights (nc=3, BCCD's). With
    `fmt='onnx'` a checkpoint (given or built) is exported to a fixed-size ONNX file first; with
    `fmt='ptc'` it runs as `detect.py --compile` (compiled for the first image's shape, untimed). Random
    weights give few or no boxes at conf 0.25, so NMS and draw are then cheaper than with a trained
    model; `dets_per_image` says how many there were.
    """
    import cv2

    import detect
    from utils.core.draw import draw_boxes
    from utils.data.images import read_image
    from utils.infer.backend import PT_SUFFIXES
    from utils.infer.runtime import apply_policy

    policy = apply_policy(threads)  # what detect.py's main() does: torch threads, allocator, ORT spin-waiting
    with tempfile.TemporaryDirectory() as d:
        if weights is None:
            from benchmarks.latency import checkpoint_for

            weights, _ = checkpoint_for(cfg, Path(d), nc=3, imgsz=imgsz)
        if fmt == "onnx" and Path(weights).suffix in PT_SUFFIXES:  # a checkpoint: time its static export
            import export

            with contextlib.redirect_stdout(io.StringIO()):  # export prints its parity check
                weights = export.run(weights, ("onnx",), imgsz=imgsz, outdir=d, threads=threads)["onnx"]
        det = detect.Detector(detect.DetectOptions(weights=weights, source=source or detect.DEFAULT_SOURCE,
                                                   imgsz=imgsz, conf_thres=conf_thres, nosave=True,
                                                   project=Path(d) / "runs", threads=threads,
                                                   spin=policy.spin, compile=fmt == "ptc"))
        files = [f for f, k in zip(det.source.items, det.source.kinds) if k == "image"]
        if not files:
            raise ValueError(f"{source}: no images to time the detect path on")
        draw_args = {"line_thickness": det.opts.line_thickness, "hide_labels": False, "hide_conf": False}
        times: dict[str, list[float]] = {k: [] for k in STAGES}
        n_det, order = 0, files[:warmup] + files * passes
        det.prepare(read_image(files[0]))  # .pt: warms up (ptc: compiles) here, for the first image's shape
        for k, f in enumerate(order):
            t = [time.perf_counter()]
            img = read_image(f)
            t.append(time.perf_counter())
            lb, ratio_pad = det.letterbox(img)
            t.append(time.perf_counter())
            x = detect.to_tensor(lb)
            t.append(time.perf_counter())
            pred = det.backend(x)
            t.append(time.perf_counter())
            boxes = det.postprocess(pred, x.shape[2:], img.shape, ratio_pad)
            t.append(time.perf_counter())
            draw_boxes(img, boxes[:, :4], boxes[:, 5], boxes[:, 4], det.backend.names, **draw_args)
            t.append(time.perf_counter())
            cv2.imencode(Path(f).suffix or ".jpg", img)
            t.append(time.perf_counter())
            if k >= warmup:  # the first images pay for lazy initialisation and cold caches
                n_det += len(boxes)
                for s, a, b in zip(STAGES, t, t[1:]):
                    times[s].append((b - a) * 1e3)
        ms = {s: statistics.median(v) for s, v in times.items()}
        ms["total"] = statistics.median([sum(v) for v in zip(*times.values())])
        n = len(times["read"])
        used = det.backend.fmt + (" --compile" if det.backend.compiled else "")
        return PathResult(ms, n, n_det / n, Path(weights).name, used, tuple(det.imgsz))


def markdown(r: PathResult) -> str:
    """The stage table: one row per stage with median ms and its multiple of the model's time."""
    lines = [f"detect.py per-image path: {r.weights} ({r.fmt}), {r.imgsz[0]}x{r.imgsz[1]}, {r.images} images, "
             f"{r.dets_per_image:.1f} detections/image, median ms per stage:", "",
             "| stage | ms | x model |", "|---|---:|---:|"]
    for s in (*STAGES, "total"):
        lines.append(f"| {s} | {r.ms[s]:.2f} | {r.ms[s] / r.ms['model']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=None, help=".pt/.onnx/.torchscript (default: random-weight --cfg)")
    p.add_argument("--cfg", default="models/mobilenetv3-small-yolo.yaml")
    p.add_argument("--format", default="pt", choices=("pt", "ptc", "onnx"),
                   help="pt, ptc (detect.py --compile) or onnx (exported from the checkpoint)")
    p.add_argument("--source", default=None, help="images (default: data/bccd/images/val)")
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--passes", type=int, default=1, help="times over the images")
    p.add_argument("--conf-thres", type=float, default=0.25)
    a = p.parse_args(argv)
    r = run(a.weights, a.cfg, a.source, a.imgsz, a.threads, a.passes, conf_thres=a.conf_thres, fmt=a.format)
    print(markdown(r))


if __name__ == "__main__":
    main()
