"""Checkpoints as plain data: written atomically, read with `torch.load(weights_only=True)`.

A checkpoint is a dict (see docs/CONTRACTS.md): `model` and `ema` state_dicts, the model `yaml` dict,
`names`, `anchors` [nl, na, 2] px, `stride` [nl], `hyp`, `args`, `epoch`, `optimizer`, `best_fitness`,
`updates`, `date`, `version`. No pickled classes, so loading never runs code from the file.
YOLOv5 v6/v7 files are read too, by a restricted unpickler (`models.yolov5_compat`), into the same shape.
"""
from __future__ import annotations

import datetime
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.yolo import Model
from models.yolov5_compat import (
    YOLOv5Error,
    is_yolov5_global,
    read_yolov5,
    refused_global,
)
from utils.core.errors import UserError

CHECKPOINT_VERSION = 1
REQUIRED_KEYS = ("model", "yaml", "names")


class CheckpointError(UserError, ValueError):
    """A file that is missing, truncated, not a MobileYOLO checkpoint, or does not fit the model."""


def to_plain(obj: Any) -> Any:
    """Recursively turn Paths, numpy values and tuples into types `weights_only` loading accepts."""
    if isinstance(obj, dict):
        return {str(k) if isinstance(k, Path) else k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def save_checkpoint(ckpt: dict, path: str | Path) -> Path:
    """Write `ckpt` to `path` atomically: a temp file in the same folder, fsync, then `os.replace`.

    A crash at any moment leaves either the old file or the new one, never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = to_plain({"version": CHECKPOINT_VERSION, "date": datetime.datetime.now().isoformat(timespec="seconds"),
                     **ckpt})
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def torch_load_reason(e: BaseException) -> str:
    """The useful part of a `torch.load` error: `global 'io.open' is not allowed` when the unpickler refused
    a global, else its own sentence or the first one; ANSI colour codes removed, at most 200 chars."""
    name = refused_global(e)
    if name is not None:  # torch words this differently per case (a blocked module, an unlisted global)
        return f"global '{name}' is not allowed"
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    m = re.search(r"WeightsUnpickler error: (.+?)(?:\. |\.?$)", text, flags=re.MULTILINE)
    line = m.group(1) if m else (text.splitlines()[0].split(". ")[0] if text else type(e).__name__)
    return line.strip()[:200]


def foreign_format(path: str | Path) -> str | None:
    """'yolov5' or 'ultralytics' when the file pickles that project's model classes, else None.

    Reads the pickle's global names statically (`torch.serialization.get_unsafe_globals_in_checkpoint`);
    nothing in the file is loaded or run.
    """
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001  (not a torch.save zip file: not one of these either)
        return None
    if any(is_yolov5_global(n) for n in names):
        return "yolov5"
    return "ultralytics" if any(n.startswith("ultralytics.") for n in names) else None


def load_yolov5(path: str | Path) -> dict:
    """A YOLOv5 v6/v7 `.pt` file as our checkpoint dict (`models.yolov5_compat.read_yolov5`: a restricted
    unpickler, nothing in the file runs); CheckpointError naming the file and, for code, the global."""
    try:
        return {"version": CHECKPOINT_VERSION, **read_yolov5(path)}
    except YOLOv5Error as e:
        raise CheckpointError(f"{path}: {e}") from None


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint with `weights_only=True`; raise `CheckpointError` naming the file and the reason.

    A YOLOv5 v6/v7 file (pickled YOLOv5 classes) is read by `load_yolov5` into the same dict shape, with
    `converted_from` set; any other pickled code is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: file is empty (0 bytes), not a checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (torch raises RuntimeError, UnpicklingError, EOFError... for bad files)
        refused = "weights only" in str(e).lower()
        foreign = foreign_format(path) if refused else None
        if foreign == "yolov5":
            return load_yolov5(path)
        if foreign == "ultralytics":
            raise CheckpointError(f"{path}: an Ultralytics (YOLOv8 or later) checkpoint; MobileYOLO reads its own "
                                  "checkpoints and YOLOv5 v6/v7 ones") from None
        kind = "refused unsafe content" if refused else "unreadable or truncated"
        raise CheckpointError(f"{path}: not a valid MobileYOLO checkpoint ({kind}: {torch_load_reason(e)})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a MobileYOLO checkpoint (holds a {type(ckpt).__name__}, expected a dict)")
    missing = [k for k in REQUIRED_KEYS if ckpt.get(k) is None]
    if missing:
        raise CheckpointError(f"{path}: not a MobileYOLO checkpoint (missing keys: {', '.join(missing)})")
    return ckpt


def model_from_checkpoint(ckpt: dict | str | Path, ema: bool = True) -> torch.nn.Module:
    """Build the `Model` from the checkpoint's own YAML dict and load its (EMA) weights, in eval mode.

    The EMA weights are used when present and `ema` is true; a state_dict that does not fit the YAML
    raises `CheckpointError` listing the first mismatching keys.
    """
    src = "checkpoint"
    if not isinstance(ckpt, dict):
        src = str(ckpt)
        ckpt = load_checkpoint(ckpt)
    model = Model(ckpt["yaml"])
    model.names = list(ckpt["names"])
    state = ckpt["ema"] if ema and ckpt.get("ema") is not None else ckpt["model"]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()][:4]
        raise CheckpointError(f"{src}: weights do not fit the model YAML stored with them: {' '.join(lines)[:400]}") from None
    if ckpt.get("stride") is not None:
        model.stride = torch.as_tensor(ckpt["stride"], dtype=torch.float32)
    return model.eval()
