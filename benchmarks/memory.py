"""Resident memory over long runs: does it stay flat after warm-up?

    python benchmarks/memory.py detect --frames 10000     # detect.py's loop over a synthetic 320x240 MJPG video
    python benchmarks/memory.py val --images 5000         # val.py's evaluate over synthetic images
    python benchmarks/memory.py train                     # `python train.py` (40 epochs on BCCD): RSS per epoch
    python benchmarks/memory.py train --epochs 3          # a quick check
    python benchmarks/memory.py all --frames 500 --images 200 --epochs 2   # all three, small

RSS is read from /proc/self/status (VmRSS; Linux), in MiB, for this process; DataLoader workers are
separate processes, so the train and val modes also print their workers' PSS (proportional set size from
/proc/PID/smaps_rollup: shared pages split between sharers, so the sum is meaningful). Inputs are
synthetic and written to a temporary folder; the detector is a randomly initialised `--cfg` model (memory
does not depend on what the weights have learnt) unless `--weights` is given. Figures only: nothing is
asserted (tests/benchmarks/test_memory.py runs each mode small).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import cv2
import numpy as np
import torch

import detect
import train
from models.checkpoint import save_checkpoint
from models.yolo import Model
from utils.data import check_dataset, create_dataloader
from utils.data.synthetic import make_synthetic_dataset
from utils.eval.evaluator import evaluate
from utils.infer.backend import DetectBackend
from utils.train.config import TrainConfig

DEFAULT_CFG = "models/mobilenetv3-small-yolo.yaml"
Sample = tuple[int, float, float]  # (frame / image / epoch count, RSS MiB, workers' PSS MiB)


def rss_mb(pid: int | str = "self") -> float:
    """Resident memory (VmRSS) of `pid` in MiB from /proc; NaN where /proc is not there."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def children_pss_mb() -> float:
    """Summed PSS (MiB) of this process's children (DataLoader workers), 0.0 without any or without /proc."""
    me, total = str(os.getpid()), 0.0
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if d.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1] != me:
                continue
            for line in d.joinpath("smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) / 1024
        except (OSError, IndexError, ValueError):
            continue
    return total


def sample(n: int) -> Sample:
    return n, rss_mb(), children_pss_mb()


def trimmed_rss_mb() -> float:
    """RSS (MiB) after glibc's `malloc_trim(0)` has handed freed heap pages back to the kernel: what the
    process still holds, without the allocator's retained free memory. NaN without glibc."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        return float("nan")
    return rss_mb()


def random_checkpoint(path: Path, cfg: str = DEFAULT_CFG, nc: int = 3, imgsz: int = 320,
                      logit: float | None = 0.0) -> Path:
    """A randomly initialised detector of `cfg` saved as a checkpoint (what detect.py and val.py load).

    `logit`: objectness and class biases of the head (0: confidence ~0.25 everywhere, so NMS, drawing and
    label writing get boxes on every frame; None keeps the initialisation, which detects nothing).
    """
    torch.manual_seed(0)
    m = Model(train.repo_path(cfg), nc=nc)
    if logit is not None:
        with torch.no_grad():
            for conv in m.detect.m:
                conv.bias.view(m.detect.na, m.detect.no)[:, 4:] = logit
    save_checkpoint({"model": m.state_dict(), "ema": None, "yaml": m.yaml, "names": [f"c{i}" for i in range(nc)],
                     "anchors": m.detect.anchors, "stride": m.stride, "hyp": {}, "args": {"imgsz": imgsz},
                     "epoch": -1, "optimizer": None, "best_fitness": 0.0}, path)
    return path


def write_video(path: Path, frames: int, size: tuple[int, int] = (320, 240), fps: float = 30.0) -> Path:
    """An MJPG .avi of `frames` frames of `size` (w, h): noise with a moving square (a few kB per frame)."""
    w, h = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write MJPG video to {path}")
    rng = np.random.default_rng(0)
    noise = [rng.integers(80, 160, size=(h, w, 3), dtype=np.uint8) for _ in range(8)]
    for i in range(frames):
        img = noise[i % 8].copy()
        x = (3 * i) % max(w - 40, 1)
        cv2.rectangle(img, (x, 40), (x + 40, 90), (40, 40, 220), -1)
        writer.write(img)
    writer.release()
    return path


def marks(total: int, first: int) -> list[int]:
    """Sample points: `first`, then ten evenly spaced up to `total` (1000, 2000, ... 10000 for 10000)."""
    step = max(total // 10, 1)
    return sorted({min(first, total), *range(step, total + 1, step), total})


def detect_memory(frames: int = 10_000, size: tuple[int, int] = (320, 240), imgsz: int = 320,
                  weights: str | Path | None = None, cfg: str = DEFAULT_CFG, max_det: int = 30,
                  workdir: Path | None = None, log: Callable[[str], None] = print) -> list[Sample]:
    """detect.py's loop (`detect.Detector.frames`, annotated video and --save-txt labels written) over a
    synthetic video of `frames` frames; RSS after frame 100 (warm-up) and at every tenth of the video.
    The random model puts `max_det` boxes on every frame."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        log(f"detect: writing a {frames}-frame {size[0]}x{size[1]} MJPG video...")
        video = write_video(tmp / "long.avi", frames, size)
        weights = weights or random_checkpoint(tmp / "model.pt", cfg, imgsz=imgsz)
        det = detect.Detector(detect.DetectOptions(weights=weights, source=video, imgsz=imgsz, project=tmp / "out",
                                                   max_det=max_det, save_txt=True))
        points, out = set(marks(frames, min(100, frames))), []
        for n, _ in enumerate(det.frames(), start=1):
            if n in points:
                out.append(sample(n))
                log(f"detect: frame {n:>6}: RSS {out[-1][1]:7.1f} MiB")
        log(det.summary())
    return out


class _Sampled:
    """A DataLoader wrapper that records (images seen, RSS, workers' PSS) at chosen image counts."""

    def __init__(self, loader: Any, points: list[int], log: Callable[[str], None]) -> None:
        self.loader, self.points, self.log, self.out = loader, points, log, []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        seen, todo = 0, list(self.points)
        for batch in self.loader:
            yield batch  # the evaluator has finished the previous batch when it asks for this one
            seen += len(batch[2])
            if todo and seen >= todo[0]:
                todo = [t for t in todo if t > seen]
                self.out.append(sample(seen))
                self.log(f"val: image {seen:>6}: RSS {self.out[-1][1]:7.1f} MiB, workers' PSS {self.out[-1][2]:7.1f} MiB")


def val_memory(images: int = 5_000, imgsz: int = 320, batch_size: int = 16, workers: int = 2,
               weights: str | Path | None = None, cfg: str = DEFAULT_CFG, img_px: int = 160,
               workdir: Path | None = None, log: Callable[[str], None] = print) -> list[Sample]:
    """val.py's evaluate over `images` synthetic images (`img_px` px, up to 3 boxes each), as val.py runs
    it (DetectBackend, rect batches, workers); RSS after about 10 batches (warm-up), at every tenth of the
    images, and once more after the metrics (the last sample, counted as `images + 1`)."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        log(f"val: writing {images} synthetic {img_px}-px images...")
        data = check_dataset(make_synthetic_dataset(tmp / "ds", n_train=1, n_val=images, imgsz=img_px, nc=3))
        # the head's own initial biases: few boxes pass val's conf 0.001 (biases of 0 put 300 on every image)
        weights = weights or random_checkpoint(tmp / "model.pt", cfg, nc=3, imgsz=imgsz, logit=None)
        backend = DetectBackend(weights)
        loader, _ = create_dataloader(data.val, imgsz, batch_size, stride=backend.stride, rect=True, workers=workers,
                                      pad=0.5, nc=data.nc, prefix="val: ")
        sampled = _Sampled(loader, marks(images, min(10 * batch_size, images)), log)
        evaluate(backend, sampled, data.names, save_dir=None, plots=False)
        sampled.out.append(sample(images + 1))
        log(f"val: after the metrics: RSS {sampled.out[-1][1]:7.1f} MiB")
        return sampled.out


def train_memory(log: Callable[[str], None] = print, workdir: Path | None = None, trim: bool = False,
                 **overrides: Any) -> list[Sample]:
    """`train.run(TrainConfig(**overrides))` (no overrides: `python train.py`, 40 epochs on BCCD) with an
    `on_fit_epoch_end` callback; RSS and the workers' PSS after every epoch. With `trim`, each line also
    gives the RSS after `malloc_trim(0)` (memory the allocator kept versus memory still in use; the trim
    itself changes what later epochs measure). Outputs go to a temp folder unless `project` is given."""
    out: list[Sample] = []

    def record(epoch: int, _row: dict) -> None:
        out.append(sample(epoch + 1))
        after = f", after malloc_trim {trimmed_rss_mb():7.1f} MiB" if trim else ""
        log(f"train: epoch {epoch + 1:>3}: RSS {out[-1][1]:7.1f} MiB, workers' PSS {out[-1][2]:7.1f} MiB{after}")

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        overrides.setdefault("project", str(Path(tmp) / "runs"))
        train.run(TrainConfig(**overrides), callbacks={"on_fit_epoch_end": record})
    return out


def summary(name: str, samples: list[Sample], unit: str) -> str:
    """One line: first (after warm-up) and last RSS and the change between them."""
    if not samples:
        return f"{name}: no samples"
    (n0, r0, _), (n1, r1, _) = samples[0], samples[-1]
    return f"{name}: RSS {r0:.1f} MiB at {unit} {n0} -> {r1:.1f} MiB at {unit} {n1} ({r1 - r0:+.1f} MiB)"


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["detect", "val", "train", "all"])
    p.add_argument("--frames", type=int, default=10_000, help="detect: video length")
    p.add_argument("--images", type=int, default=5_000, help="val: number of images")
    p.add_argument("--epochs", type=int, default=None, help="train: epochs (default: train.py's)")
    p.add_argument("--weights", default=None, help="detect/val: a checkpoint (default: a random --cfg model)")
    p.add_argument("--cfg", default=DEFAULT_CFG, help="detect/val: model YAML of the random model")
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--workers", type=int, default=2, help="val: DataLoader workers")
    p.add_argument("--trim", action="store_true", help="train: also print the RSS after malloc_trim(0)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for detect/val (default 1: memory, not speed, on a shared machine); "
                        "train keeps torch's default as `python train.py` does")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, list[Sample]]:
    o = parse_opt(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(o.threads)
    res: dict[str, list[Sample]] = {}
    if o.mode in ("detect", "all"):
        res["detect"] = detect_memory(o.frames, imgsz=o.imgsz, weights=o.weights, cfg=o.cfg)
    if o.mode in ("val", "all"):
        res["val"] = val_memory(o.images, imgsz=o.imgsz, workers=o.workers, weights=o.weights, cfg=o.cfg)
    torch.set_num_threads(threads)
    if o.mode in ("train", "all"):
        res["train"] = train_memory(trim=o.trim, **({"epochs": o.epochs} if o.epochs else {}))
    for name, unit in (("detect", "frame"), ("val", "image"), ("train", "epoch")):
        if name in res:
            print(summary(name, res[name], unit))
    return res


if __name__ == "__main__":
    main()
