"""`YoloDataset`: scanned images + labels, loading, augmentation, letterbox, rectangular batches.

Reproducibility: item `i` in epoch `e` draws every random number from
`np.random.default_rng([seed, e, i])`, so a batch depends only on (seed, epoch, indices), never on the
worker that made it. The epoch lives in a shared-memory tensor so `set_epoch` reaches persistent
worker processes too (call it before iterating the loader for that epoch).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from utils.ops.boxes import xywhn2xyxy, xyxy2xywhn
from utils.data import augment as A
from utils.data.data_yaml import IMG_FORMATS, LOGGER, DataConfigError, list_image_files, load_hyp
from utils.data.images import read_image, resize_long_side
from utils.data.letterbox import letterbox
from utils.data.scan import scan_images, skip_note

Shapes = tuple[tuple[int, int], tuple[tuple[float, float], tuple[float, float]]] | None


def _mem_available() -> int:
    """Bytes of RAM available (Linux /proc/meminfo; elsewhere the free physical pages)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class YoloDataset(Dataset):
    """Images + labels of one split.

    Attributes: `im_files: list[str]`, `labels: list[np.ndarray [n, 5] float32 (cls, cx, cy, w, h)]`
    normalised to the original (displayed) image, `shapes: np.ndarray [n, 2] (w, h)`, `nc`,
    `batch_shapes` ([nb, 2] (h, w), rect only), `skip_note` (what the scan skipped, e.g.
    '3 images skipped: see above', or ''). Item: `(img uint8 [3, H, W] RGB, targets float32 [n, 6]
    (0, cls, cx, cy, w, h) normalised to H, W, path, shapes)` with shapes = ((h0, w0), ((rh, rw),
    (padw, padh))) in val mode, or None for a training item (mosaic has no single original).
    """

    def __init__(self, sources: list[Path] | Path | str, imgsz: int = 320, batch_size: int = 16,
                 augment: bool = False, hyp: dict | None = None, rect: bool = False, cache: str | None = None,
                 stride: int = 32, pad: float = 0.0, seed: int = 0, nc: int | None = None, prefix: str = "",
                 require_labels: bool | None = None) -> None:
        self.imgsz, self.augment, self.stride, self.seed, self.nc = imgsz, augment, stride, seed, nc
        self.hyp = hyp if hyp is not None else load_hyp()
        self.rect = rect
        self.prefix = prefix
        files = list_image_files(sources)
        where = ", ".join(map(str, sources)) if isinstance(sources, (list, tuple)) else str(sources)
        if not files:
            raise DataConfigError(f"{prefix}no images ({', '.join(IMG_FORMATS)}) found in {where}")
        srcs = [Path(x) for x in (sources if isinstance(sources, (list, tuple)) else [sources])]
        res = scan_images(files, nc=nc, prefix=prefix, folders=[x for x in srcs if x.is_dir()])
        self.skip_note = skip_note(res)  # '3 images skipped: see above' or '', for the run's summary
        if not res.im_files:
            raise DataConfigError(f"{prefix}no usable image in {where}: all {res.n_corrupt} are corrupt")
        if (augment if require_labels is None else require_labels) and not any(len(lb) for lb in res.labels):
            raise DataConfigError(f"{prefix}no labels in {where}: every image is a background "
                                  f"(labels are looked up under a 'labels' folder beside 'images')")
        self.im_files, self.labels, self.shapes = res.im_files, res.labels, res.shapes
        self.batch_shapes, self.batch_index = None, None
        if rect:
            self._make_rect(batch_size, pad)
        self.ims: list[np.ndarray | None] = [None] * len(self.im_files)
        if cache == "ram":
            self._cache_ram()
        elif cache not in (None, "", False):
            raise ValueError(f"cache must be None or 'ram', got {cache!r}")
        self._epoch = torch.zeros(1, dtype=torch.long).share_memory_()
        self._canvas: np.ndarray | None = None
        self.sampler = None  # set by create_dataloader so set_epoch also reshuffles

    def __len__(self) -> int:
        return len(self.im_files)

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation/shuffle stream of `epoch` (visible to running worker processes)."""
        self._epoch[0] = int(epoch)
        if self.sampler is not None and hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(int(epoch))

    def _make_rect(self, batch_size: int, pad: float) -> None:
        """Sort by aspect ratio and give each batch the smallest stride-multiple shape that fits it."""
        ar = self.shapes[:, 1] / self.shapes[:, 0]  # h / w
        order = ar.argsort()
        self.im_files = [self.im_files[i] for i in order]
        self.labels = [self.labels[i] for i in order]
        self.shapes, ar = self.shapes[order], ar[order]
        n = len(order)
        self.batch_index = np.arange(n) // batch_size
        nb = int(self.batch_index[-1]) + 1
        shapes = np.ones((nb, 2))
        for b in range(nb):
            a = ar[self.batch_index == b]
            if a.max() < 1:
                shapes[b] = (a.max(), 1)
            elif a.min() > 1:
                shapes[b] = (1, 1 / a.min())
        self.batch_shapes = (np.ceil(shapes * self.imgsz / self.stride + pad) * self.stride).astype(int)

    def _cache_ram(self) -> None:
        w, h = self.shapes[:, 0].astype(float), self.shapes[:, 1].astype(float)
        r = self.imgsz / np.maximum(w, h)
        need = float((np.round(w * r) * np.round(h * r) * 3).sum())
        avail = _mem_available()
        if need * 2 > avail:  # keep half of free RAM for the model, workers and the OS
            LOGGER.warning("%s--cache ram needs %.1f GB, only %.1f GB available; not caching", self.prefix,
                           need / 1e9, avail / 1e9)
            return
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as ex:
            it = ex.map(lambda i: self._read(i), range(len(self)))
            for i, im in enumerate(tqdm(it, total=len(self), desc=f"{self.prefix}caching {need / 1e9:.2f} GB")):
                self.ims[i] = im

    def _read(self, i: int) -> np.ndarray:
        img = read_image(self.im_files[i], max_side=self.imgsz, size_hint=tuple(self.shapes[i]))
        interp = cv2.INTER_LINEAR if self.augment else cv2.INTER_AREA
        return resize_long_side(img, self.imgsz, interp_down=interp)

    def load_image(self, i: int) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
        """BGR image resized so its long side is `imgsz` -> (img, (h0, w0) original, (h, w) resized)."""
        img = self.ims[i] if self.ims[i] is not None else self._read(i)
        w0, h0 = (int(v) for v in self.shapes[i])
        return img, (h0, w0), img.shape[:2]

    def _pixel_labels(self, i: int, w: float, h: float, padw: float = 0.0, padh: float = 0.0) -> np.ndarray:
        lab = self.labels[i].copy()
        if len(lab):
            lab[:, 1:] = xywhn2xyxy(lab[:, 1:], w, h, padw, padh)
        return lab

    def _load_mosaic(self, i: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        s = self.imgsz
        idx = [i] + rng.integers(0, len(self), 3).tolist()
        imgs, labs = [], []
        for j in idx:
            img, _, (h, w) = self.load_image(j)
            imgs.append(img)
            labs.append(self._pixel_labels(j, w, h))
        canvas, labels = A.mosaic4(imgs, labs, s, rng, canvas=self._canvas)
        self._canvas = canvas  # reused by the next item in this process; the warp below copies out of it
        labels = A.clip_labels_to(labels, 2 * s, 2 * s)
        hy = self.hyp
        return A.random_perspective(canvas, labels, rng, degrees=hy.get("degrees", 0), translate=hy.get("translate", 0),
                                    scale=hy.get("scale", 0), shear=hy.get("shear", 0),
                                    perspective=hy.get("perspective", 0), out_size=(s, s))

    def _train_item(self, i: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Augmented BGR image and labels [n, 5] (cls, cx, cy, w, h) normalised to it."""
        hy = self.hyp
        if rng.random() < hy.get("mosaic", 0) and not self.rect:  # rect batches need one shape per batch
            img, labels = self._load_mosaic(i, rng)
            if rng.random() < hy.get("mixup", 0):
                img2, labels2 = self._load_mosaic(int(rng.integers(0, len(self))), rng)
                img, labels = A.mixup(img, labels, img2, labels2, rng)
        else:
            img, _, (h, w) = self.load_image(i)
            shape = self.batch_shapes[self.batch_index[i]] if self.rect else self.imgsz
            img, (rh, rw), (pw, ph) = letterbox(img, shape, auto=False, scaleup=True)
            labels = self._pixel_labels(i, rw * w, rh * h, pw, ph)
            img, labels = A.random_perspective(img, labels, rng, degrees=hy.get("degrees", 0),
                                               translate=hy.get("translate", 0), scale=hy.get("scale", 0),
                                               shear=hy.get("shear", 0), perspective=hy.get("perspective", 0))
        h, w = img.shape[:2]
        labels_n = labels.astype(np.float32).copy()
        if len(labels_n):
            labels_n[:, 1:] = xyxy2xywhn(labels_n[:, 1:5], w, h, clip=True)
        A.augment_hsv(img, rng, hy.get("hsv_h", 0), hy.get("hsv_s", 0), hy.get("hsv_v", 0))
        if rng.random() < hy.get("flipud", 0):
            img, labels_n = A.flip_ud(img, labels_n)
        if rng.random() < hy.get("fliplr", 0):
            img, labels_n = A.flip_lr(img, labels_n)
        return img, labels_n

    def _val_item(self, i: int) -> tuple[np.ndarray, np.ndarray, Shapes]:
        img, (h0, w0), (h, w) = self.load_image(i)
        shape = self.batch_shapes[self.batch_index[i]] if self.rect else self.imgsz
        img, (rh, rw), (pw, ph) = letterbox(img, tuple(shape) if self.rect else shape, auto=False, scaleup=False)
        nh, nw = img.shape[:2]
        lab = self.labels[i].copy()
        if len(lab):  # original-normalised -> letterboxed-normalised, no pixel rounding involved
            lab[:, 1] = (lab[:, 1] * w * rw + pw) / nw
            lab[:, 2] = (lab[:, 2] * h * rh + ph) / nh
            lab[:, 3] *= w * rw / nw
            lab[:, 4] *= h * rh / nh
        shapes = ((h0, w0), ((h * rh / h0, w * rw / w0), (pw, ph)))
        return img, lab, shapes

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, str, Shapes]:
        if self.augment:
            img, labels_n = self._train_item(i, np.random.default_rng([self.seed, self.epoch, int(i)]))
            shapes = None
        else:
            img, labels_n, shapes = self._val_item(i)
        out = torch.zeros((len(labels_n), 6), dtype=torch.float32)
        if len(labels_n):
            out[:, 1:] = torch.from_numpy(labels_n.astype(np.float32))
        img = np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1))  # HWC BGR -> CHW RGB
        return torch.from_numpy(img), out, self.im_files[i], shapes

