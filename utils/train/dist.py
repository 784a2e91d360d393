"""Distributed training helpers for `torchrun`: process group set-up, rank info, seeding, broadcasts.

`torchrun --nproc_per_node N train.py ...` sets RANK, LOCAL_RANK and WORLD_SIZE in each worker's
environment; a plain `python train.py` has none of them and runs as a single process (rank -1).
"""
from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: `rank`/`local_rank` are -1 and `world_size` 1 outside torchrun."""

    rank: int = -1
    local_rank: int = -1
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on the process that writes files, validates and prints (rank 0, or the only process)."""
        return self.rank in (-1, 0)


def dist_from_env(env: dict[str, str] | None = None) -> DistInfo:
    """Read torchrun's RANK / LOCAL_RANK / WORLD_SIZE; raise ValueError naming a malformed variable."""
    env = os.environ if env is None else env
    vals = {}
    for key, default in (("RANK", "-1"), ("LOCAL_RANK", "-1"), ("WORLD_SIZE", "1")):
        raw = env.get(key, default)
        try:
            vals[key] = int(raw)
        except ValueError:
            raise ValueError(f"environment variable {key}={raw!r} is not an integer (set by torchrun)") from None
    if vals["WORLD_SIZE"] < 1:
        raise ValueError(f"environment variable WORLD_SIZE={vals['WORLD_SIZE']} must be >= 1")
    if vals["WORLD_SIZE"] == 1:
        return DistInfo(rank=-1, local_rank=-1, world_size=1)
    return DistInfo(rank=vals["RANK"], local_rank=vals["LOCAL_RANK"], world_size=vals["WORLD_SIZE"])


def init_distributed(info: DistInfo, device: torch.device) -> None:
    """Join the process group: NCCL when training on CUDA, gloo on CPU. No-op for a single process."""
    if not info.distributed or (dist.is_available() and dist.is_initialized()):
        return
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build; run without torchrun")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"
    dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size)


def cleanup_distributed() -> None:
    """Leave the process group (safe to call when none was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op for a single process)."""
    if info.distributed and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_process_first(info: DistInfo) -> Iterator[None]:
    """Let rank 0 run the block first (e.g. writing a label cache) while the others wait, then the rest."""
    if info.distributed and not info.is_main:
        barrier(info)
    yield
    if info.distributed and info.is_main:
        barrier(info)


def broadcast_flag(flag: bool, info: DistInfo, src: int = 0) -> bool:
    """Rank `src`'s boolean on every rank (e.g. the early-stop decision); the flag itself when single."""
    if not (info.distributed and dist.is_initialized()):
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.broadcast(t, src=src)
    return bool(t.item())


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when `flag` is true on any rank (e.g. a non-finite loss, so all ranks skip the
    same step and none waits on the others' gradients); the flag itself when single."""
    if not (info.distributed and dist.is_initialized()):
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def seed_everything(seed: int, rank: int = -1, deterministic: bool = False) -> int:
    """Seed python, numpy and torch with `seed + max(rank, 0)` so ranks draw different augmentations.

    Returns the seed used. `deterministic` also asks torch for deterministic kernels (slower).
    """
    s = int(seed) + max(int(rank), 0)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    return s
