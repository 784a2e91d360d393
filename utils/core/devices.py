"""Device selection with the strings YOLOv5 users type: `cpu`, `0`, `0,1`, `cuda:1`, `mps` or `` (auto)."""
from __future__ import annotations

import torch

from utils.core.errors import FlagError


def parse_device(device: str | int | None) -> tuple[str, list[int]]:
    """Split a device string into a kind (`cpu`, `cuda`, `mps`, `auto`) and its CUDA indices.

    `'0,1'` -> `('cuda', [0, 1])`, `'cuda:1'` -> `('cuda', [1])`, `'cpu'` -> `('cpu', [])`,
    `''`/`None` -> `('auto', [])`. Raises `FlagError` (a ValueError) naming the bad string.
    """
    s = str(device if device is not None else "").strip().lower().replace(" ", "")
    if s in ("", "auto"):
        return "auto", []
    if s in ("cpu", "mps"):
        return s, []
    if s == "cuda":
        return "cuda", [0]
    s = s.removeprefix("cuda:")
    parts = [p for p in s.split(",") if p != ""]
    if not parts or not all(p.isdigit() for p in parts):
        raise FlagError(f"--device {device!r}: expected 'cpu', 'mps', a CUDA index like '0' or a list like '0,1'")
    ids = [int(p) for p in parts]
    if len(set(ids)) != len(ids):
        raise FlagError(f"--device {device!r}: a CUDA index is repeated")
    return "cuda", ids


def select_device(device: str | int | None = "cpu", local_rank: int = -1) -> torch.device:
    """Return the `torch.device` to train or infer on.

    `local_rank >= 0` (a torchrun worker) picks `cuda:local_rank` for CUDA requests (torchrun starts one
    process per listed GPU). A CUDA request on a machine without (enough) GPUs is an error that says
    what is available (`FlagError`, a ValueError), not a CUDA traceback later.
    """
    kind, ids = parse_device(device)
    if kind == "auto":
        kind, ids = ("cuda", [0]) if torch.cuda.is_available() else ("cpu", [])
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise FlagError("--device mps: MPS is not available on this machine; use --device cpu")
        return torch.device("mps")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        raise FlagError(f"--device {device!r}: CUDA is not available on this machine; use --device cpu")
    bad = [i for i in ids if i >= n]
    if bad:
        raise FlagError(f"--device {device!r}: CUDA index {bad[0]} requested but only {n} GPU(s) visible (0..{n - 1})")
    if local_rank >= 0:
        if local_rank >= len(ids):
            raise FlagError(f"--device {device!r} lists {len(ids)} GPU(s) but torchrun started local rank {local_rank}")
        return torch.device("cuda", ids[local_rank])
    return torch.device("cuda", ids[0])


def device_memory_str(device: torch.device) -> str:
    """Reserved CUDA memory as `'1.23G'` for progress bars, `'-'` off CUDA."""
    if device.type != "cuda":
        return "-"
    return f"{torch.cuda.memory_reserved(device) / 1e9:.3g}G"
