"""Detection from Python, in memory: `Predictor(weights)(images) -> Detections`.

    from utils.infer import Predictor
    model = Predictor("best.pt")                       # any file DetectBackend loads (.pt, .onnx, ...)
    results = model(["a.jpg", bgr_array, pil_image], size=320, conf=0.3)
    results.print(); results.xyxy[0]                  # tensor [n, 6]: x1, y1, x2, y2, conf, cls

The same pieces are detect.py's prediction path (its `Detector` calls `letterbox`, `preprocess`,
`postprocess` and `prepare` below), so a file gives the same boxes either way.

Inputs (one, or a list of any mix):
- a path (str or Path) to an image, or a folder, glob or `.txt` list of images (read as detect.py reads
  them: OpenCV, EXIF orientation applied; in a folder an unreadable image is skipped with a warning);
  no URLs (nothing is downloaded) and no videos or streams (use detect.py, or pass the frames);
- a numpy array as OpenCV gives it: uint8 `[h, w, 3]` **BGR** (`[h, w]` grey and `[h, w, 4]` BGRA are
  converted);
- a PIL image (any mode; converted to RGB, EXIF orientation applied);
- a torch tensor `[3, h, w]` or `[B, 3, h, w]`, floating point, **RGB**, values in 0..1 (converted to an
  8-bit image, x * 255 rounded, then treated like an array).
Every image is letterboxed to the network size (`size`, rounded up to the stride; a fixed-size export's
own size) with minimal padding, then padded to the batch's common shape, and run as one batch.
"""
from __future__ import annotations

import logging
import math
import numbers
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.core.errors import UserError
from utils.data.letterbox import letterbox
from utils.infer.backend import DetectBackend
from utils.infer.results import Detections
from utils.infer.sources import STREAM_PREFIXES, LoadSource
from utils.ops.boxes import scale_boxes
from utils.ops.nms import non_max_suppression

LOGGER = logging.getLogger("mobileyolo.detect")
PAD_VALUE = 114  # letterbox grey, also for the extra padding to a batch's common shape


class PredictError(UserError, ValueError):
    """An input image or a setting `Predictor` cannot use (the message names it)."""


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """Letterboxed BGR uint8 `[H, W, 3]` (or a batch `[B, H, W, 3]`) -> float32 RGB `[B, 3, H, W]` in 0..1,
    channels_last in memory (B = 1 for one image).

    One numpy pass does the BGR->RGB flip, the float conversion and the scaling; the HWC result is
    then viewed as NCHW (a permute, no copy), i.e. already in the channels_last layout the PyTorch
    backend runs in. numpy rather than torch: torch would run this in its OpenMP pool, whose spinning
    threads cost many times the work on a CPU shared with other processes (benchmarks/run.py).
    """
    rgb = torch.from_numpy(np.divide(img[..., ::-1], np.float32(255), dtype=np.float32))
    return rgb.permute(2, 0, 1)[None] if rgb.dim() == 3 else rgb.permute(0, 3, 1, 2)


def _from_array(a: np.ndarray, what: str) -> np.ndarray:
    if a.dtype != np.uint8:
        raise PredictError(f"{what}: numpy images must be uint8 (BGR, as OpenCV reads them), got {a.dtype}")
    if a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 1):
        a = np.repeat(a.reshape(*a.shape[:2], 1), 3, axis=2)
    elif a.ndim == 3 and a.shape[2] == 4:
        a = a[..., :3]  # BGRA: drop alpha
    elif not (a.ndim == 3 and a.shape[2] == 3):
        raise PredictError(f"{what}: numpy images must be [h, w, 3] BGR (or [h, w] grey), got shape {a.shape}")
    if min(a.shape[:2]) < 1:
        raise PredictError(f"{what}: empty image of shape {a.shape}")
    return np.ascontiguousarray(a)


def _from_tensor(x: torch.Tensor, what: str) -> list[np.ndarray]:
    if x.dim() not in (3, 4) or x.shape[-3] != 3:
        raise PredictError(f"{what}: tensors must be [3, h, w] or [B, 3, h, w] RGB, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise PredictError(f"{what}: tensors must be float RGB in 0..1, got {x.dtype} (divide uint8 by 255, "
                           f"or pass the HWC BGR numpy array)")
    x = x.detach().float().cpu()
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise PredictError(f"{what}: tensor values must lie in 0..1, got {x.min():.3g}..{x.max():.3g}")
    hwc = x.mul(255).round_().to(torch.uint8).flip(-3).movedim(-3, -1).numpy()  # RGB CHW -> BGR HWC
    return [_from_array(a, what) for a in (hwc if hwc.ndim == 4 else hwc[None])]


def _from_pil(im: Any) -> np.ndarray:
    from PIL import ImageOps

    rgb = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    return np.ascontiguousarray(rgb[..., ::-1])


def _from_path(p: str | Path) -> tuple[list[np.ndarray], list[str]]:
    if str(p).lower().startswith(STREAM_PREFIXES) or str(p).strip().isdigit():
        raise PredictError(f"{p}: URLs, streams and webcams are not read here (nothing is downloaded); pass a "
                           f"local file, or use detect.py --source for streams")
    src = LoadSource(p)  # SourceError for a missing path, an empty folder, a single unreadable image
    videos = [s for s, k in zip(src.items, src.kinds) if k != "image"]
    if videos:
        raise PredictError(f"{videos[0]}: videos are not read here; use detect.py --source, or pass its frames")
    frames = list(src)
    return [f.image for f in frames], [f.path for f in frames]


def load_images(ims: Any) -> tuple[list[np.ndarray], list[str]]:
    """Any supported input (see the module docstring), or a list/tuple of them -> (BGR uint8 `[h, w, 3]`
    images, their file names: the path, a PIL image's filename or `image<i>.jpg`). Raises `PredictError`
    (unsupported type, bad shape or dtype, URL, video) or `SourceError` (missing path) naming the input."""
    items = list(ims) if isinstance(ims, (list, tuple)) else [ims]
    if not items:
        raise PredictError("no images given (an empty list)")
    pil = sys.modules.get("PIL.Image")  # a PIL image means PIL is already imported
    images: list[np.ndarray] = []
    files: list[str] = []
    for i, item in enumerate(items):
        what = f"input {i}" if len(items) > 1 else "input"
        if isinstance(item, (str, Path)):
            got, names = _from_path(item)
        elif isinstance(item, np.ndarray):
            got, names = [_from_array(item, what)], [""]
        elif isinstance(item, torch.Tensor):
            got = _from_tensor(item, what)
            names = [""] * len(got)
        elif pil is not None and isinstance(item, pil.Image):
            got, names = [_from_pil(item)], [str(getattr(item, "filename", "") or "")]
        else:
            raise PredictError(f"{what}: unsupported type {type(item).__name__}; expected a file path, a numpy "
                               f"BGR array, a PIL image or a float RGB tensor")
        images += got
        files += [n or f"image{len(files) + k}.jpg" for k, n in enumerate(names)]
    if not images:  # e.g. a folder whose every image was unreadable (each named in a warning), [0, 3, h, w]
        raise PredictError(f"no readable image in the input ({type(ims).__name__})")
    return images, files


class Predictor:
    """Detections from images in memory: `Predictor(weights)(images, size=, conf=, iou=, classes=, max_det=)`.

    `weights`: any file `DetectBackend` loads (its format is the backend's business), or a built
    `DetectBackend` to share. `size` (int or (h, w); None: the file's own size, `backend.imgsz`),
    `conf`, `iou`, `classes` (class ids to keep, None: all), `max_det`, `agnostic` (class-agnostic NMS)
    are the defaults of every call; set them as attributes too (`model.conf = 0.5`). `threads`, `spin`,
    `compile`, `fuse` go to `DetectBackend`. The first call warms the backend up on its own letterboxed
    shape (`prepare`), so its times exclude lazy initialisation; a compiled `.pt` then letterboxes every
    image to that shape. Settings are checked on every call (`PredictError`).
    """

    def __init__(self, weights: str | Path | DetectBackend, size: int | Sequence[int] | None = None,
                 conf: float = 0.25, iou: float = 0.45, classes: Sequence[int] | None = None, max_det: int = 1000,
                 agnostic: bool = False, threads: int | None = None, spin: bool = True, compile: bool = False,
                 fuse: bool = True) -> None:
        self.backend = (weights if isinstance(weights, DetectBackend)
                        else DetectBackend(weights, threads=threads, fuse=fuse, spin=spin, compile=compile))
        self.size, self.conf, self.iou, self.classes = size, conf, iou, classes
        self.max_det, self.agnostic = max_det, agnostic
        self._prepared = False
        self._fixed_hw: tuple[int, int] | None = None  # once compiled: the compiled shape
        self._warned: set[tuple[int, int]] = set()
        self.settings()  # fail early on a bad default

    @property
    def names(self) -> list[str]:
        """Class names, index = class id."""
        return self.backend.names

    def __repr__(self) -> str:
        return (f"Predictor({self.backend!r}, size={self.size}, conf={self.conf}, iou={self.iou}, "
                f"classes={self.classes}, max_det={self.max_det})")

    # ---- settings ------------------------------------------------------------------------------
    def settings(self, **overrides: Any) -> dict[str, Any]:
        """The NMS settings of a call (attributes, overridden by the non-None `overrides`), checked:
        `conf` and `iou` in 0..1, `max_det` >= 1, `classes` ids of this model. Raises `PredictError`."""
        s = {"conf": self.conf, "iou": self.iou, "classes": self.classes, "max_det": self.max_det,
             "agnostic": self.agnostic}
        s.update({k: v for k, v in overrides.items() if v is not None})
        for k in ("conf", "iou"):
            if isinstance(s[k], bool) or not isinstance(s[k], numbers.Real) or not 0.0 <= s[k] <= 1.0:
                raise PredictError(f"{k}={s[k]!r}: must be a number in 0..1")
        if isinstance(s["max_det"], bool) or not isinstance(s["max_det"], numbers.Integral) or s["max_det"] < 1:
            raise PredictError(f"max_det={s['max_det']!r}: must be an int >= 1")
        if s["classes"] is not None:
            cl = [s["classes"]] if isinstance(s["classes"], numbers.Integral) else list(s["classes"])
            bad = [c for c in cl if isinstance(c, bool) or not isinstance(c, numbers.Integral)
                   or not 0 <= c < self.backend.nc]
            if bad:
                raise PredictError(f"classes={bad}: the model has classes 0..{self.backend.nc - 1} "
                                   f"({', '.join(self.names)})")
            s["classes"] = [int(c) for c in cl]
        return s

    def network_size(self, size: int | Sequence[int] | None = None, flag: str = "size") -> tuple[int, int]:
        """(h, w) images are letterboxed into: `size` (default `self.size`, else the file's own) rounded up
        to the stride, or a fixed-size export's (or a compiled model's) own size. `flag` names the setting in
        the warning about a changed size (detect.py: `--imgsz`)."""
        if self._fixed_hw is not None:
            return self._fixed_hw
        size = self.size if size is None else size
        if size is None:
            return tuple(self.backend.imgsz)
        want = [size] if isinstance(size, numbers.Integral) else list(size)
        if not want or len(want) > 2 or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1
                                            for v in want):
            raise PredictError(f"{flag} {size!r}: must be a positive int or (h, w)")
        h, w = int(want[0]), int(want[-1])
        b = self.backend
        if not b.dynamic:
            if (h, w) != tuple(b.imgsz) and (h, w) not in self._warned:
                self._warned.add((h, w))
                LOGGER.warning(f"{b.file.name} is a fixed-size export ({b.imgsz[0]}x{b.imgsz[1]}); "
                               f"using that instead of {flag} {h} {w}")
            return tuple(b.imgsz)
        hw = (math.ceil(h / b.stride) * b.stride, math.ceil(w / b.stride) * b.stride)
        if hw != (h, w) and (h, w) not in self._warned:
            self._warned.add((h, w))
            LOGGER.warning(f"{flag} {h} {w} is not a multiple of the stride {b.stride}; using {hw[0]} {hw[1]}")
        return hw

    # ---- the prediction path (detect.py's too) -------------------------------------------------
    def prepare(self, img: np.ndarray, hw: tuple[int, int]) -> tuple[int, int]:
        """Once, before the first timed call: warm the backend up (a `.pt` packs its weights or, with
        `compile`, compiles) for `img`'s letterboxed shape, not the square size. Returns the (h, w) to
        letterbox to from now on: `hw`, or once compiled the compiled shape (eager for any other)."""
        if self._prepared:
            return self._fixed_hw or hw
        self._prepared = True
        shape = tuple(self.letterbox(img, hw)[0].shape[:2])
        self.backend.warmup(shape)
        if self.backend.compiled:
            self._fixed_hw = shape
            LOGGER.info(f"compiled {self.backend.file.name} for {shape[0]}x{shape[1]} in "
                        f"{self.backend.compile_s:.1f} s; every frame is letterboxed to {shape[0]}x{shape[1]}")
            return shape
        return hw

    def letterbox(self, img: np.ndarray, hw: tuple[int, int]) -> tuple[np.ndarray, tuple]:
        """BGR uint8 [h, w, 3] -> (letterboxed BGR uint8 [H, W, 3], ((rh, rw), (padw, padh))): minimal
        stride padding, or exactly `hw` for backends that need fixed inputs."""
        lb, ratio, pad = letterbox(img, hw, auto=not self.backend.fixed_input, stride=self.backend.stride)
        return lb, (ratio, pad)

    def preprocess(self, ims: list[np.ndarray], hw: tuple[int, int]) -> tuple[torch.Tensor, list[tuple]]:
        """BGR images -> (float RGB `[B, 3, H, W]` 0..1, per image `((rh, rw), (padw, padh))`). Each image is
        letterboxed on its own, then centred on the batch's largest shape (grey padding)."""
        boxed = [self.letterbox(im, hw) for im in ims]
        if len(boxed) == 1:
            return to_tensor(boxed[0][0]), [boxed[0][1]]
        H, W = max(b[0].shape[0] for b in boxed), max(b[0].shape[1] for b in boxed)
        batch = np.full((len(boxed), H, W, 3), PAD_VALUE, dtype=np.uint8)
        ratio_pads = []
        for k, (lb, (ratio, (padw, padh))) in enumerate(boxed):
            h, w = lb.shape[:2]
            top, left = (H - h) // 2, (W - w) // 2
            batch[k, top:top + h, left:left + w] = lb
            ratio_pads.append((ratio, (padw + left, padh + top)))
        return to_tensor(batch), ratio_pads

    def postprocess(self, pred: torch.Tensor, in_shape: Sequence[int], shapes: list[tuple[int, ...]],
                    ratio_pads: list[tuple], **overrides: Any) -> list[torch.Tensor]:
        """Decoded `[B, N, 5+nc]` -> per image NMS'd `[n, 6]` (x1, y1, x2, y2 in that image's pixels, clipped;
        conf; cls), with `settings(**overrides)`."""
        s = self.settings(**overrides)
        dets = non_max_suppression(pred, s["conf"], s["iou"], classes=s["classes"], agnostic=s["agnostic"],
                                   max_det=s["max_det"])
        for d, shape, rp in zip(dets, shapes, ratio_pads):
            d[:, :4] = scale_boxes(tuple(in_shape), d[:, :4], shape[:2], rp)
        return dets

    def __call__(self, ims: Any, size: int | Sequence[int] | None = None, conf: float | None = None,
                 iou: float | None = None, classes: Sequence[int] | None = None, max_det: int | None = None,
                 agnostic: bool | None = None) -> Detections:
        """Detect on one image or a list (inputs: see the module docstring); keywords override the attributes
        for this call. Returns `Detections`; `t` times pre-process, inference and NMS per image (reading
        files is not timed, as in detect.py)."""
        overrides = {"conf": conf, "iou": iou, "classes": classes, "max_det": max_det, "agnostic": agnostic}
        self.settings(**overrides)  # before any file is read
        images, files = load_images(ims)
        hw = self.prepare(images[0], self.network_size(size))
        t0 = time.perf_counter()
        x, ratio_pads = self.preprocess(images, hw)
        t1 = time.perf_counter()
        pred = self.backend(x)
        t2 = time.perf_counter()
        dets = self.postprocess(pred, x.shape[2:], [im.shape for im in images], ratio_pads, **overrides)
        t3 = time.perf_counter()
        k = 1e3 / len(images)
        return Detections(images, dets, files, self.names, ((t1 - t0) * k, (t2 - t1) * k, (t3 - t2) * k),
                          tuple(x.shape))
