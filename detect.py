"""Run a trained detector on images, folders, globs, .txt lists, videos, webcams or streams.

    python detect.py                                   # BCCD val images, newest runs/train/*/weights/best.pt
    python detect.py --weights best.onnx --source video.mp4 --save-txt --save-conf
    python detect.py --source 0                        # webcam 0

Weights may be a `.pt` checkpoint, a `.torchscript` or an `.onnx` export (see export.py). Results go
to `runs/detect/expN/` (see `utils.infer.writers` for the layout). The loop handles one frame at a
time and keeps nothing per frame, so memory stays flat over long inputs.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from utils.core.errors import UserError, cli_main
from utils.core.paths import ROOT, increment_path
from utils.infer.backend import DetectBackend
from utils.infer.predictor import Predictor, to_tensor  # noqa: F401 (detect.to_tensor: benchmarks, tests)
from utils.infer.runtime import apply_policy
from utils.infer.sources import LoadSource
from utils.infer.writers import ResultWriter

LOGGER = logging.getLogger("mobileyolo.detect")
DEFAULT_SOURCE = ROOT / "data" / "bccd" / "images" / "val"
TRAIN_RUNS = ROOT / "runs" / "train"


class DetectError(UserError, ValueError):
    """Bad detect.py arguments, or no weights to run (the message says what to do)."""


@dataclass
class DetectOptions:
    """Everything detect.py does, as typed settings (the CLI flags, same names)."""

    weights: str | Path | None = None  # None: newest runs/train/*/weights/best.pt
    source: str | Path = DEFAULT_SOURCE
    imgsz: int | tuple[int, int] | list[int] = 320  # px, (h, w) or one value for both
    conf_thres: float = 0.25
    iou_thres: float = 0.45
    max_det: int = 1000
    classes: list[int] | None = None
    agnostic_nms: bool = False
    save_txt: bool = False
    save_conf: bool = False
    save_crop: bool = False
    nosave: bool = False
    view_img: bool = False
    line_thickness: int = 2
    hide_labels: bool = False
    hide_conf: bool = False
    vid_stride: int = 1
    project: str | Path = ROOT / "runs" / "detect"
    name: str = "exp"
    exist_ok: bool = False
    threads: int | None = None  # ONNX Runtime/torch intra-op threads; None: physical cores (ORT)
    compile: bool = False  # .pt on the CPU: torch.compile for the first frame's letterboxed shape (utils/infer/compiled.py)
    spin: bool = True  # ONNX Runtime threads may spin-wait (main() sets it from utils.infer.runtime.apply_policy)


@dataclass
class FrameResult:
    """One processed frame: `det [n, 6]` float32 rows x1, y1, x2, y2 (original-image pixels), conf, cls."""

    path: str
    index: int
    det: np.ndarray


@dataclass
class Speed:
    """Accumulated seconds per stage and frames seen; `ms()` gives per-image milliseconds."""

    pre: float = 0.0
    inf: float = 0.0
    nms: float = 0.0
    n: int = 0
    shape: tuple[int, ...] = field(default_factory=tuple)

    def ms(self) -> tuple[float, float, float]:
        k = 1e3 / max(self.n, 1)
        return self.pre * k, self.inf * k, self.nms * k


def newest_best(runs: Path | None = None) -> Path:
    """The most recently written `<runs>/*/weights/best.pt` (default `runs/train`); `DetectError` if none."""
    runs = Path(runs) if runs is not None else TRAIN_RUNS
    found = sorted(runs.glob("*/weights/best.pt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise DetectError(f"no trained weights found ({runs}/*/weights/best.pt): train first, "
                          f"e.g. `python train.py --data data/bccd.yaml`, or pass --weights")
    return found[-1]


def _check_options(o: DetectOptions) -> None:
    if not 0.0 <= o.conf_thres <= 1.0 or not 0.0 <= o.iou_thres <= 1.0:
        raise DetectError(f"--conf-thres {o.conf_thres} / --iou-thres {o.iou_thres}: both must be in 0..1")
    if o.max_det < 1 or o.vid_stride < 1 or o.line_thickness < 1:
        raise DetectError("--max-det, --vid-stride and --line-thickness must be >= 1")


class Detector:
    """The detect loop as an object: `frames()` yields a `FrameResult` per frame and writes outputs.

    Building it validates the weights and the source before any output folder is created. Each frame
    takes the Python API's prediction path (`self.predictor`, a `utils.infer.predictor.Predictor` over
    the same backend): its letterbox, tensor conversion, NMS and box scaling, one frame per batch.
    """

    def __init__(self, opts: DetectOptions) -> None:
        _check_options(opts)
        self.opts = opts
        weights = Path(opts.weights) if opts.weights else newest_best()
        self.backend = DetectBackend(weights, threads=opts.threads, spin=opts.spin, compile=opts.compile)
        if opts.compile and self.backend.fmt != "pt":
            LOGGER.warning(f"--compile applies to .pt weights only; {weights.name} runs as {self.backend.fmt}")
        self.source = LoadSource(opts.source, opts.vid_stride)
        if opts.classes:
            bad = [c for c in opts.classes if not 0 <= int(c) < self.backend.nc]
            if bad:
                raise DetectError(f"--classes {bad}: the model has classes 0..{self.backend.nc - 1} "
                                  f"({', '.join(self.backend.names)})")
        self.predictor = Predictor(self.backend, size=opts.imgsz, conf=opts.conf_thres, iou=opts.iou_thres,
                                   classes=opts.classes, max_det=opts.max_det, agnostic=opts.agnostic_nms)
        self.imgsz = self.predictor.network_size(flag="--imgsz")  # (h, w); prepare() may fix it to a compiled shape
        self.save_dir = increment_path(Path(opts.project) / opts.name, exist_ok=opts.exist_ok, mkdir=True)
        self.speed = Speed()
        self.detections = 0

    def prepare(self, img: np.ndarray) -> None:
        """Before the first frame is timed: warm up (.pt: pack or, with --compile, compile) for `img`'s
        letterboxed shape, not the square --imgsz (`Predictor.prepare`). Once compiled, every frame is
        letterboxed to that shape (same-sized frames: the usual minimal padding)."""
        self.imgsz = self.predictor.prepare(img, self.imgsz)

    def letterbox(self, img: np.ndarray) -> tuple[np.ndarray, tuple]:
        """BGR uint8 [h, w, 3] -> (letterboxed BGR uint8 [H, W, 3], ((rh, rw), (padw, padh)))."""
        return self.predictor.letterbox(img, self.imgsz)

    def preprocess(self, img: np.ndarray) -> tuple[torch.Tensor, tuple]:
        """BGR uint8 [h, w, 3] -> (float RGB [1, 3, H, W] 0..1, ((rh, rw), (padw, padh)))."""
        x, ratio_pads = self.predictor.preprocess([img], self.imgsz)
        return x, ratio_pads[0]

    def postprocess(self, pred: torch.Tensor, in_shape: tuple[int, int], img_shape: tuple[int, ...],
                    ratio_pad: tuple) -> np.ndarray:
        """Decoded `[1, N, 5+nc]` -> NMS'd detections `[n, 6]` float32 in the original image's pixels."""
        return self.predictor.postprocess(pred, in_shape, [img_shape], [ratio_pad])[0].cpu().numpy()

    def detect(self, img: np.ndarray) -> np.ndarray:
        """Detections `[n, 6]` (x1, y1, x2, y2 in `img` pixels, conf, cls) for one BGR image; timed."""
        self.prepare(img)
        t0 = time.perf_counter()
        x, ratio_pad = self.preprocess(img)
        t1 = time.perf_counter()
        pred = self.backend(x)
        t2 = time.perf_counter()
        det = self.postprocess(pred, x.shape[2:], img.shape, ratio_pad)
        t3 = time.perf_counter()
        s = self.speed
        s.pre, s.inf, s.nms, s.n, s.shape = s.pre + t1 - t0, s.inf + t2 - t1, s.nms + t3 - t2, s.n + 1, tuple(x.shape)
        return det

    def frames(self) -> Iterator[FrameResult]:
        """Run over the whole source, writing outputs; yields one `FrameResult` per frame."""
        o = self.opts
        writer = ResultWriter(self.save_dir, save_img=not o.nosave, save_txt=o.save_txt, save_conf=o.save_conf,
                              save_crop=o.save_crop, view_img=o.view_img, line_thickness=o.line_thickness,
                              hide_labels=o.hide_labels, hide_conf=o.hide_conf, vid_stride=o.vid_stride)
        self.writer = writer
        bar = tqdm(total=len(self.source) or None, unit="frame", desc="detect", dynamic_ncols=True,
                   file=sys.stderr, leave=True)
        with writer, bar, logging_redirect_tqdm():  # warnings print above the bar, not through it
            last = None
            for frame in self.source:
                if frame.path != last:  # only when the file changes: set_description redraws the bar
                    bar.set_description(Path(frame.path).name[:40])
                    last = frame.path
                det = self.detect(frame.image)
                self.detections += len(det)
                writer.write(frame, det, self.backend.names)
                bar.update(1)
                yield FrameResult(frame.path, frame.index, det)

    def summary(self) -> str:
        """The closing line: frames, per-image ms per stage, where results went."""
        pre, inf, nms = self.speed.ms()
        c = self.writer.counts if hasattr(self, "writer") else {}
        where = []
        if c.get("images") or c.get("videos"):
            where.append(f"{c['images']} images, {c['videos']} videos")
        if c.get("labels"):
            where.append(f"{c['labels']} label files in labels/")
        if c.get("crops"):
            where.append(f"{c['crops']} crops in crops/")
        saved = f"results saved to {self.save_dir} ({'; '.join(where)})" if where else "nothing saved (--nosave)"
        return (f"{self.speed.n} frames, {self.detections} detections. Speed per image: {pre:.1f}ms pre-process, "
                f"{inf:.1f}ms inference, {nms:.1f}ms NMS at shape {self.speed.shape} "
                f"({self.backend.fmt}{', compiled' if self.backend.compiled else ''}); {saved}"
                + (f". {note}" if (note := self.source.skipped_note()) else ""))  # '2 images skipped: see above'


def run(**kwargs: object) -> Detector:
    """detect.py's body: `run(weights=..., source=..., ...)` with `DetectOptions` fields as keywords.

    Prints a progress bar and the closing summary line; returns the finished `Detector` (its
    `save_dir`, `speed`, `writer.counts`). Raises `DetectError`, `BackendError`, `SourceError`.
    """
    det = Detector(DetectOptions(**kwargs))
    for _ in det.frames():
        pass
    print(det.summary())
    return det


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Run a MobileYOLO detector on images, videos, webcams or streams.")
    p.add_argument("--weights", default=None, help=".pt, .torchscript or .onnx (default: newest runs/train best.pt)")
    p.add_argument("--source", default=str(DEFAULT_SOURCE),
                   help="image, folder, glob, .txt list, video, webcam index or stream URL")
    p.add_argument("--imgsz", "--img", "--img-size", nargs="+", type=int, default=[320], help="inference size h [w]")
    p.add_argument("--conf-thres", type=float, default=0.25, help="confidence threshold (obj * class prob)")
    p.add_argument("--iou-thres", type=float, default=0.45, help="NMS IoU threshold")
    p.add_argument("--max-det", type=int, default=1000, help="maximum detections per image")
    p.add_argument("--classes", nargs="+", type=int, help="keep only these class ids, e.g. --classes 0 2")
    p.add_argument("--agnostic-nms", action="store_true", help="class-agnostic NMS")
    p.add_argument("--save-txt", action="store_true", help="save YOLO labels to labels/*.txt")
    p.add_argument("--save-conf", action="store_true", help="add confidences to --save-txt labels")
    p.add_argument("--save-crop", action="store_true", help="save box crops to crops/<class>/")
    p.add_argument("--nosave", action="store_true", help="do not save annotated images/videos")
    p.add_argument("--view-img", action="store_true", help="show results in a window")
    p.add_argument("--line-thickness", type=int, default=2, help="box line thickness (px)")
    p.add_argument("--hide-labels", action="store_true", help="draw boxes without labels")
    p.add_argument("--hide-conf", action="store_true", help="draw labels without confidences")
    p.add_argument("--vid-stride", type=int, default=1, help="use every n-th video frame")
    p.add_argument("--project", default=str(ROOT / "runs" / "detect"), help="save to project/name")
    p.add_argument("--name", default="exp", help="save to project/name")
    p.add_argument("--exist-ok", action="store_true", help="reuse project/name instead of incrementing")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for inference (default: physical cores)")
    p.add_argument("--compile", action="store_true",
                   help=".pt on the CPU: torch.compile once for the first frame's letterboxed shape (seconds, "
                        "needs a C++ compiler), then faster frames; later frames are letterboxed to that shape")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry: parse, apply the runtime policy once, run. Errors propagate (`cli_main` prints them)."""
    opt = parse_opt(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    policy = apply_policy(threads=opt.threads)
    run(**vars(opt), spin=policy.spin)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main("detect.py", main))
