"""What every format runner shares: the backend's error, lazy optional imports, file look-up, decoding.

A runner (`utils/infer/formats/<fmt>.py`, contract in docs/CONTRACTS.md, "Formats") loads one export and
maps a float32 `[B, 3, H, W]` 0..1 array to the decoded `[B, N, 5 + nc]` array. Runners whose graph ends
at the head's raw maps decode them here with our own decoder (`utils.ops.decode.decode`), anchors and
strides read from the export's metadata, so every format decodes exactly alike.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from utils.core.errors import UserError
from utils.export.metadata import parse_metadata
from utils.ops.decode import decode

REQUIREMENTS = "requirements-export.txt"


class BackendError(UserError, ValueError):
    """A weights file that is missing, of an unknown type, or not a MobileYOLO model."""


def require(package: str, fmt: str, file: str | Path) -> ModuleType:
    """Import the optional `package` (e.g. "openvino") for `fmt`; a missing one is a one-line `BackendError`."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise BackendError(f"{file}: {fmt} needs {package.split('.')[0]}: pip install -r {REQUIREMENTS}") from None


def find_model_file(path: str | Path, suffix: str) -> Path:
    """`path` itself when it is a `suffix` file, else the one `*suffix` file inside the folder `path`.

    Raises `BackendError` naming `path` when there is none or more than one.
    """
    path = Path(path)
    if path.is_file():
        return path
    found = sorted(path.glob(f"*{suffix}")) if path.is_dir() else []
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise BackendError(f"{path}: {what} {suffix} file(s) in this export folder; expected exactly one")
    return found[0]


def check_metadata(metadata: dict[str, str], file: str | Path) -> dict[str, str]:
    """`metadata` itself when it is MobileYOLO export metadata, else `BackendError` naming `file`."""
    if parse_metadata(metadata) is None:
        raise BackendError(f"{file}: no MobileYOLO metadata (names/stride/imgsz) in this file; export it "
                           f"with `python export.py --weights best.pt`")
    return metadata


def metadata_value(metadata: dict[str, str], key: str, file: str | Path) -> object:
    """One decoded metadata value; `BackendError` naming `file` when it is missing or not JSON."""
    try:
        return json.loads(metadata[key])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise BackendError(f"{file}: metadata has no valid '{key}'; re-export with this version of export.py") from None


def decode_maps(maps: list[np.ndarray], metadata: dict[str, str], file: str | Path = "export") -> np.ndarray:
    """Raw head maps -> decoded float32 `[B, N, 5 + nc]` exactly as `utils.ops.decode.decode`.

    Each map is `[B, na*no, H, W]` (the head's 1x1 conv output), `[B, H, W, na*no]` or
    `[B, na, H, W, no]`; maps may come in any order and are matched to levels by size (largest map =
    smallest stride). Anchors (pixels) and strides come from `metadata` (`export_metadata(anchors=...)`).
    """
    anchors = torch.tensor(metadata_value(metadata, "anchors", file), dtype=torch.float32)
    strides = torch.tensor(metadata_value(metadata, "strides", file), dtype=torch.float32)
    nl, na = int(anchors.shape[0]), int(anchors.shape[1])
    no = 5 + int(metadata_value(metadata, "nc", file))
    if len(maps) != nl:
        raise BackendError(f"{file}: {len(maps)} output maps, the metadata says {nl} levels")
    out = []
    for m in maps:
        t = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))
        if t.dim() == 4 and t.shape[1] != na * no and t.shape[-1] == na * no:
            t = t.permute(0, 3, 1, 2)  # NHWC -> NCHW
        if t.dim() == 4 and t.shape[1] == na * no:
            b, _, h, w = t.shape
            t = t.reshape(b, na, no, h, w).permute(0, 1, 3, 4, 2)
        if t.dim() != 5 or t.shape[1] != na or t.shape[-1] != no:
            raise BackendError(f"{file}: output map of shape {tuple(m.shape)} is not a head map with "
                               f"{na} anchors x {no} outputs")
        out.append(t.contiguous())
    out.sort(key=lambda t: -t.shape[2] * t.shape[3])
    with torch.no_grad():
        return decode(out, anchors, strides).numpy()
