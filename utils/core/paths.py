"""Run-folder naming as YOLOv5 users know it: runs/train/exp, exp2, exp3, ..."""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # repository root


def increment_path(path: str | Path, exist_ok: bool = False, mkdir: bool = False) -> Path:
    """Return `path` if it is free (or `exist_ok`), else `path2`, `path3`, ... (first free number).

    `runs/train/exp` -> `runs/train/exp2` when `exp` exists. With `mkdir` the folder is created.
    """
    path = Path(path)
    if path.exists() and not exist_ok:
        stem = re.sub(r"\d+$", "", path.name)
        taken = {p.name for p in path.parent.iterdir()} if path.parent.exists() else set()
        n = 2
        while f"{stem}{n}" in taken:
            n += 1
        path = path.with_name(f"{stem}{n}")
    if mkdir:
        path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` through a uniquely named temp file and `os.replace`: readers see the old file
    or the new one, never a part; on any error the temp file is removed and `path` is untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path
