"""Images per second of the training loader (mosaic + affine + HSV + flips) on a dataset, default BCCD.

    python benchmarks/dataloader.py                      # 320 and 640, workers 0 and 2, batch 16
    python benchmarks/dataloader.py --imgsz 320 --workers 2 --batches 40

The target (issue 3): the loader alone delivers >= 3x the images/s of one training step of
mobilenetv3-small-yolo at 320, batch 16. Timings exclude the first batches (worker start-up, caches).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))


def machine() -> str:
    """CPU model, cores, and library versions, so a figure can be compared with another machine's."""
    import cv2
    import numpy
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    avail = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"CPU: {cpu}, {os.cpu_count()} logical cores ({avail} usable), python {platform.python_version()}, "
            f"torch {torch.__version__}, cv2 {cv2.__version__}, numpy {numpy.__version__}, "
            f"torch threads {torch.get_num_threads()}")


def time_loader(sources: list[Path], imgsz: int, workers: int, batch_size: int, batches: int, warmup: int,
                nc: int, cache: str | None = None) -> float:
    """Images/s over `batches` batches after `warmup` batches, cycling epochs as needed."""
    from utils.data import create_dataloader, load_hyp

    loader, ds = create_dataloader(sources, imgsz, batch_size, hyp=load_hyp(), augment=True, workers=workers,
                                   shuffle=True, seed=0, nc=nc, cache=cache, prefix=f"{imgsz}/w{workers}: ")
    n_img, t0, seen, epoch = 0, None, 0, 0
    while seen < warmup + batches:
        ds.set_epoch(epoch)
        for imgs, _, _, _ in loader:
            seen += 1
            if seen == warmup:
                t0 = time.perf_counter()
            elif seen > warmup:
                n_img += imgs.shape[0]
            if seen >= warmup + batches:
                break
        epoch += 1
    dt = time.perf_counter() - t0
    del loader  # stop persistent workers before the next configuration
    return n_img / dt


def run(data: str = "bccd", imgsz: tuple[int, ...] = (320, 640), workers: tuple[int, ...] = (0, 2),
        batch_size: int = 16, batches: int = 20, warmup: int = 2, cache: str | None = None) -> list[dict]:
    """Print and return one row per (imgsz, workers): images/s of the training loader."""
    from utils.data import check_dataset

    cfg = check_dataset(data)
    print(machine())
    print(f"data {cfg.yaml_file}, batch {batch_size}, {batches} timed batches after {warmup} warm-up, "
          f"mosaic on (hyp default), cache {cache}")
    rows = []
    for s in imgsz:
        for w in workers:
            ips = time_loader(cfg.train, s, w, batch_size, batches, warmup, cfg.nc, cache)
            rows.append({"imgsz": s, "workers": w, "images_per_s": ips})
            print(f"imgsz {s:4d}  workers {w}  {ips:8.1f} images/s  ({ips / batch_size:.2f} batches/s)")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="bccd")
    ap.add_argument("--imgsz", type=int, nargs="+", default=[320, 640])
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--cache", default=None, choices=[None, "ram"])
    a = ap.parse_args()
    run(a.data, tuple(a.imgsz), tuple(a.workers), a.batch_size, a.batches, a.warmup, a.cache)


if __name__ == "__main__":
    main()
