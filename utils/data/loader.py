"""`create_dataloader`: YoloDataset + sampler + seeded workers + collate.

A batch is `(imgs uint8 [B, 3, H, W] RGB, targets float32 [N, 6] = (index in batch, cls, cx, cy, w, h)
normalised to H, W, paths list[str], shapes list)`; see `YoloDataset` for `shapes`.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from collections.abc import Iterator

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from torch.utils.data.distributed import DistributedSampler

from utils.data.data_yaml import LOGGER
from utils.data.dataset import YoloDataset

Batch = tuple[torch.Tensor, torch.Tensor, list[str], list]


def collate_fn(items: list[tuple]) -> Batch:
    """Stack images and concatenate targets, writing each target's image index into column 0."""
    imgs, targets, paths, shapes = zip(*items)
    for i, t in enumerate(targets):
        t[:, 0] = i
    return torch.stack(imgs, 0), torch.cat(targets, 0), list(paths), list(shapes)


class EpochSampler(Sampler[int]):
    """Order of one epoch: a permutation drawn from (seed, epoch) when shuffling, else 0..n-1."""

    def __init__(self, n: int, shuffle: bool, seed: int = 0) -> None:
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        return iter(np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist())

    def __len__(self) -> int:
        return self.n


def seed_worker(worker_id: int) -> None:
    """Seed every RNG of a worker from torch's per-worker seed (itself from the loader's generator)."""
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)
    cv2.setNumThreads(0)  # OpenCV's own thread pool in every worker oversubscribes the cores


def create_dataloader(sources: list[Path], imgsz: int, batch_size: int, stride: int = 32, hyp: dict | None = None,
                      augment: bool = False, cache: str | None = None, rect: bool = False, workers: int = 2,
                      shuffle: bool = False, seed: int = 0, nc: int | None = None, prefix: str = "",
                      rank: int = -1, world_size: int = 1, pad: float = 0.0) -> tuple[DataLoader, YoloDataset]:
    """Build the dataset and its loader. `batch_size` is per process; `rank >= 0` uses a DistributedSampler.

    `stride` is the model's max stride (an int, or a model's `stride` tensor/list whose max is used).

    Raises DataConfigError before any training when the split has no usable image, or (augment=True,
    i.e. a train split) no label at all. `rect` keeps the aspect-sorted order, so it turns `shuffle` off.
    Call `dataset.set_epoch(e)` before iterating epoch `e` for fresh, reproducible shuffling and
    augmentation.
    """
    stride = int(np.asarray(stride).max())  # an int, a list, or a model's stride tensor
    if rect and shuffle:
        LOGGER.warning("%s--rect is incompatible with shuffle; shuffle turned off", prefix)
        shuffle = False
    dataset = YoloDataset(sources, imgsz=imgsz, batch_size=batch_size, augment=augment, hyp=hyp, rect=rect,
                          cache=cache, stride=stride, pad=pad, seed=seed, nc=nc, prefix=prefix)
    batch_size = max(1, min(batch_size, len(dataset)))
    nw = max(0, min(workers, os.cpu_count() or 1, batch_size if batch_size > 1 else workers))
    if rank >= 0:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
    else:
        sampler = EpochSampler(len(dataset), shuffle, seed)
    dataset.sampler = sampler
    gen = torch.Generator()
    gen.manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=nw, collate_fn=collate_fn,
                        pin_memory=torch.cuda.is_available(), worker_init_fn=seed_worker, generator=gen,
                        persistent_workers=nw > 0, prefetch_factor=4 if nw > 0 else None)
    return loader, dataset
