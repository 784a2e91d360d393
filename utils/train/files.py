"""Atomic file writes for a run's outputs (results.csv, args.yaml, hyp.yaml, results.png, checkpoints).

Each write goes to a uniquely named temp file in the target's folder and is `os.replace`d onto the target,
so a crash, a full disk or a second run writing the same folder (`--exist-ok`) leaves the old file or the
new one, never a mix. A full disk (ENOSPC, EDQUOT) raises `DiskFullError` naming the file.
"""
from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from utils.core.errors import UserError

FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


class DiskFullError(UserError, OSError):
    """No space left (or quota exceeded) while writing a file of the run; the message names the file."""


def is_disk_full(e: BaseException) -> bool:
    """True for an OSError that means the disk (or the user's quota) is full."""
    return isinstance(e, OSError) and e.errno in FULL_ERRNOS


def disk_full_error(path: str | Path, hint: str = "") -> DiskFullError:
    """The one-line error for a write to `path` that ran out of space (`hint` appended)."""
    return with_errno(DiskFullError(f"no space left on device while writing {path}{hint}"), errno.ENOSPC)


def with_errno(e: OSError, code: int | None) -> Any:
    """`e` (built from its message only, so `str(e)` is the message) with `errno` set to `code`."""
    e.errno = code
    return e


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "w") -> Path:
    """Call `write(f)` on a uniquely named temp file next to `path`, then `os.replace` it onto `path`.

    Readers (and a second run writing the same file) see the old file or the new one, never a mix; on any
    error the temp file is removed and `path` is untouched. ENOSPC/EDQUOT raise `DiskFullError`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise (disk_full_error(path) if is_disk_full(e) else e) from None
    try:
        os.fchmod(fd, path.stat().st_mode & 0o777 if path.exists() else 0o644)  # mkstemp's own is 0o600
        with os.fdopen(fd, mode, **({"newline": ""} if "b" not in mode else {})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if is_disk_full(e):
            raise disk_full_error(path, f" ({path.name} from before is kept)") from None
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically (see `atomic_write`)."""
    return atomic_write(path, lambda f: f.write(text))


