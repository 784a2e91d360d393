"""NCNN export through pnnx: `best_ncnn_model/` with `model.ncnn.param`, `model.ncnn.bin`, `metadata.yaml`.

ncnn has no 5-D tensors and no `narrow`, so the graph ends at the head's 1x1 convs (`HeadMaps`: one
`[na * no, H, W]` map per level) and the runner decodes outside it with our own decoder
(`utils.infer.formats.ncnn.NCNNRunner`). The network is traced with TorchScript at batch 1 and
converted by the `pnnx` binary (from the `pnnx` package) in a temporary folder, so none of its
by-products (`*.pnnx.*`, `*_pnnx.py`, `*_ncnn.py`) land in the working directory. Weights stay float32
(`fp16=0`): ncnn converts them at load time when a device wants fp16, and the parity check needs float32.
The folder is assembled beside the target and moved into place, so an interrupted export leaves no
half-written model. The ncnn graph runs any input size (convs, pooling and scale-factor resizes only),
so the metadata says `dynamic: true`; the runner feeds a batch image by image.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from utils.core.errors import UserError
from utils.export.headmaps import HeadMaps, require_package, with_anchors
from utils.export.metadata import write_metadata_yaml

PARAM, BIN = "model.ncnn.param", "model.ncnn.bin"
NCNN_MAGIC = "7767517"  # first line of every ncnn .param file


class NCNNExportError(UserError, RuntimeError):
    """pnnx failed or produced no ncnn files."""


def ncnn_dir(weights: str | Path, outdir: str | Path | None = None) -> Path:
    """YOLOv5's folder name for an NCNN export of `weights`: `<stem>_ncnn_model/` beside it (or in `outdir`)."""
    weights = Path(weights)
    return Path(outdir or weights.parent) / f"{weights.stem}_ncnn_model"


def export_ncnn(wrapper: nn.Module, im: torch.Tensor, folder: str | Path, metadata: dict[str, str],
                timeout: float = 600.0) -> Path:
    """Export the detector inside `wrapper` (a `Decoder` or `Model`) to the NCNN folder `folder`.

    `im`: a `[b, 3, h, w]` example input (only its first image's shape is used). Returns `folder`, which
    holds `model.ncnn.param`, `model.ncnn.bin` and `metadata.yaml` (`metadata` plus `anchors`, with
    `dynamic: true` and `batch: 1`). Raises `MissingPackageError` without pnnx and `NCNNExportError`
    when pnnx fails (its last output lines in the message).
    """
    pnnx = require_package("pnnx", "ncnn")
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    maps = HeadMaps(wrapper).eval()
    x = torch.zeros_like(im[:1])
    with tempfile.TemporaryDirectory(prefix=".ncnn-", dir=folder.parent) as tmp:
        work = Path(tmp)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream; pnnx reads it
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.jit.trace(maps, x, check_trace=False).save(str(work / "model.pt"))
        shape = ",".join(str(int(d)) for d in x.shape)
        cmd = [pnnx.EXEC_PATH, "model.pt", f"inputshape=[{shape}]f32", "fp16=0", "device=cpu"]
        try:
            run = subprocess.run(cmd, check=False, cwd=work, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise NCNNExportError(f"{folder}: pnnx did not run ({e})") from None
        param, weights = work / PARAM, work / BIN
        if run.returncode or not param.is_file() or not weights.is_file():
            tail = " | ".join((run.stdout + run.stderr).strip().splitlines()[-3:])
            raise NCNNExportError(f"{folder}: pnnx failed (exit {run.returncode}): {tail}")
        out = work / folder.name
        out.mkdir()
        shutil.move(param, out / PARAM)
        shutil.move(weights, out / BIN)
        write_metadata_yaml(with_anchors(metadata, wrapper, dynamic=True, batch=1), out)
        if folder.is_dir():
            shutil.rmtree(folder)
        elif folder.exists():
            folder.unlink()
        out.rename(folder)
    return folder
