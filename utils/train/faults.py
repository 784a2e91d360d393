"""Faults during training and how a run meets them (docs/RELIABILITY.md, "Faults during training").

- Ctrl-C: `StopRequest` turns the first SIGINT into a request that train.py honours after the current
  batch (a resumable `last.pt`, then `TrainingInterrupted`, exit 130); a second Ctrl-C stops at once.
- A full disk: `write_checkpoint` and `atomic_write_text` write a temp file and `os.replace` it, so the
  previous file survives; ENOSPC/EDQUOT becomes `DiskFullError` naming the file (exit 2).
- Non-finite losses: `NonFiniteGuard` counts skipped steps and raises `NonFiniteLossError` after
  `limit` in a row, naming the epoch and batch and the last good checkpoint.
- An unwritable run folder: `check_writable` fails before any work.
"""
from __future__ import annotations

import errno
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Self

from models.checkpoint import save_checkpoint
from utils.core.errors import UserError
from utils.train.config import NAN_LIMIT
from utils.train.files import disk_full_error, is_disk_full, with_errno


class NonFiniteLossError(UserError, FloatingPointError):
    """Too many non-finite losses in a row; the message names the epoch, batch and last good checkpoint."""


class RunFolderError(UserError, OSError):
    """The run folder (`--project`, or a resumed run's folder) cannot be written; names the folder."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C honoured after a step: `last` is the resumable checkpoint written (cli_main exits 130)."""

    def __init__(self, message: str, last: Path) -> None:
        super().__init__(message)
        self.last = last


def write_checkpoint(ckpt: dict, path: str | Path, resume_from: str | Path | None = None) -> Path:
    """`save_checkpoint` (temp file + `os.replace`), with a full disk as a `DiskFullError` naming `path`.

    The previous file at `path` stays as it was and no temp file is left. `resume_from`: the checkpoint a
    user would resume from, named in the message.
    """
    try:
        return save_checkpoint(ckpt, path)
    except OSError as e:
        if not is_disk_full(e):
            raise
        path = Path(path)
        old = f"; {path.name} from before is kept" if path.exists() else ""
        again = ""
        if resume_from and Path(resume_from).exists():
            again = f"; free some space, then: python train.py --resume {resume_from}"
        raise disk_full_error(path, old + again) from None


def check_writable(folder: str | Path, what: str, hint: str = "") -> None:
    """Raise `RunFolderError` unless a file can be created in `folder` (or in its nearest existing parent
    when it does not exist yet, since it would be made there). Creates nothing that stays."""
    folder = Path(folder)
    p = folder.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise with_errno(RunFolderError(f"{what} {folder}: cannot create it, {p} is a file"), errno.ENOTDIR)
    try:
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        err = RunFolderError(f"{what} {folder}: cannot write there ({reason}: {p}); {hint or f'pass a writable {what}'}")
        raise with_errno(err, e.errno) from None


class StopRequest:
    """Context manager: while active, the first SIGINT (Ctrl-C) only sets `requested`; a second one raises
    KeyboardInterrupt at once. Inactive (plain Ctrl-C behaviour) when `enabled` is false or outside the
    main thread, where Python allows no signal handler. The handler prints nothing (a print inside a
    signal handler can collide with the progress bar's own write); the caller reports the request.
    DataLoader workers forked while it is active inherit it, so a terminal's Ctrl-C does not kill them.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False
        self._prev: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> Self:
        if self.enabled:
            self._prev = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            signal.signal(signal.SIGINT, self._prev if self._prev is not None else signal.default_int_handler)


class NonFiniteGuard:
    """Counts optimizer steps skipped for a non-finite loss (or gradient) in a row.

    `bad(where, value)` prints a warning and raises `NonFiniteLossError` at the `limit`-th in a row;
    `good()` resets the count. `last_good` (set by the caller after each checkpoint) is named in the error.
    """

    def __init__(self, limit: int = NAN_LIMIT, verbose: bool = True) -> None:
        self.limit = max(int(limit), 1)
        self.verbose = verbose  # False on DDP ranks but 0: one warning per skipped step
        self.in_row = 0
        self.skipped = 0
        self.first: str = ""
        self.last_good: str = "none written yet"

    def good(self) -> None:
        self.in_row = 0

    def bad(self, where: str, what: str) -> None:
        """Count a skipped step at `where` ("epoch 2/40 batch 7/23"); `what` says why ("loss is nan")."""
        self.in_row += 1
        self.skipped += 1
        if self.in_row == 1:
            self.first = where
        if self.verbose:
            print(f"\nWARNING {where}: {what}; step skipped (no optimizer or EMA update), "
                  f"{self.in_row} in a row, the run stops at {self.limit} (--nan-limit)", file=sys.stderr, flush=True)
        if self.in_row >= self.limit:
            raise NonFiniteLossError(f"{where}: loss not finite for {self.in_row} batches in a row (since {self.first}); "
                                     f"stopped. Last good checkpoint: {self.last_good}. Lower lr0 (--hyp) or check "
                                     f"the labels, then start again from it (--weights) or resume it (--resume)")
