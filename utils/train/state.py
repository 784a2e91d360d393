"""The state of one training run between epochs (`Run`, built by train.py's `setup()`), its folder, and
what Ctrl-C leaves behind (`interrupt_run`)."""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from utils.core.paths import increment_path
from utils.train.config import TrainConfig
from utils.train.dist import DistInfo
from utils.train.ema import ModelEMA
from utils.train.faults import (
    NonFiniteGuard,
    StopRequest,
    TrainingInterrupted,
    write_checkpoint,
)
from utils.train.setup import make_checkpoint

Callbacks = dict[str, Callable[..., None]]


@dataclass
class Run:
    """Everything one training run holds between epochs (built by `setup()`)."""

    cfg: TrainConfig
    info: DistInfo
    device: torch.device
    hyp: dict
    names: list[str]
    model: nn.Module
    ema: ModelEMA | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    loss_fn: Any
    train_loader: Any
    train_ds: Any
    val_loader: Any
    save_dir: Path | None
    lf: Callable[[int], float]
    accumulate: int
    nw: int
    start_epoch: int = 0
    best_fitness: float = 0.0
    best_epoch: int = -1
    last_opt_step: int = -1
    callbacks: Callbacks = field(default_factory=dict)
    tb: Any = None
    guard: NonFiniteGuard = field(default_factory=NonFiniteGuard)
    stop: StopRequest | None = None  # set while the epoch loop runs (Ctrl-C after the current batch)

    @property
    def amp(self) -> bool:
        return self.device.type == "cuda"

    @property
    def weights_dir(self) -> Path:
        assert self.save_dir is not None, "only the main process writes files"
        return self.save_dir / "weights"

    def emit(self, event: str, *args: Any) -> None:
        if event in self.callbacks:
            self.callbacks[event](*args)


def make_save_dir(cfg: TrainConfig, info: DistInfo) -> Path | None:
    """The run folder (rank 0 only): the checkpoint's on resume, else the next free `project/name`."""
    if not info.is_main:
        return None
    save_dir = Path(cfg.save_dir) if cfg.resume else increment_path(Path(cfg.project) / cfg.name, cfg.exist_ok)
    (save_dir / "weights").mkdir(parents=True, exist_ok=True)
    cfg.save_dir = str(save_dir)
    return save_dir


def interrupt_run(r: Run, done: int, where: str) -> NoReturn:
    """Ctrl-C: write a resumable last.pt and raise `TrainingInterrupted` (exit 130).

    The checkpoint holds the weights, optimizer and EMA as they are now, with `epoch` = `done` (the last
    finished epoch, -1 for none), so `--resume` restarts the unfinished epoch from its first batch (the
    steps already taken in it stay in the weights; gradients accumulated since the last step are dropped).
    """
    last = r.weights_dir / "last.pt"
    ckpt = make_checkpoint(r.model, r.ema, r.optimizer, r.hyp, r.cfg, done, r.best_fitness, r.best_epoch)
    write_checkpoint(ckpt, last, resume_from=last if last.exists() else None)
    redo = f"; epoch {done + 2} restarts from its first batch" if done + 1 < r.cfg.epochs else ""
    msg = (f"\nInterrupted (Ctrl-C) {where}: saved {last} ({done + 1}/{r.cfg.epochs} epochs done{redo}).\n"
           f"Resume with: python train.py --resume {last}")
    sys.stdout.flush()
    print(msg, file=sys.stderr, flush=True)
    raise TrainingInterrupted(msg.strip(), last)
