"""ExecuTorch export: `best.pte`, the network lowered to the XNNPACK backend (float32).

As for NCNN and TFLite, the graph ends at the head's 1x1 convs (`utils.export.headmaps.HeadMaps`: one
`[b, na * no, H_i, W_i]` map per level) and the runner (`utils.infer.formats.executorch`) decodes with our
own decoder. `torch.export` fixes the program to the example input's shape (batch and size); the runner
runs other batch sizes in chunks. The metadata (`export_metadata`'s raw string mapping plus `anchors`)
is a constant method of the program, `METADATA_METHOD`, returning its JSON as a uint8 tensor, so the one
`.pte` file carries it. The file is written to a temp name and moved into place.
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from utils.core.errors import UserError
from utils.export.headmaps import HeadMaps, require_package, with_anchors

METADATA_METHOD = "mobileyolo_metadata"  # constant method returning the metadata JSON as a uint8 tensor


class ExecuTorchExportError(UserError, RuntimeError):
    """torch.export or the ExecuTorch lowering failed on the model."""


def pte_file(weights: str | Path, outdir: str | Path | None = None) -> Path:
    """YOLOv5's name for an ExecuTorch export of `weights`: `<stem>.pte` beside it (or in `outdir`)."""
    weights = Path(weights)
    return Path(outdir or weights.parent) / f"{weights.stem}.pte"


def metadata_tensor(metadata: dict[str, str]) -> torch.Tensor:
    """The metadata mapping as the uint8 tensor of its JSON (what `METADATA_METHOD` returns)."""
    return torch.frombuffer(bytearray(json.dumps(metadata, sort_keys=True).encode()), dtype=torch.uint8).clone()


def export_executorch(wrapper: nn.Module, im: torch.Tensor, file: str | Path, metadata: dict[str, str]) -> Path:
    """Export the detector inside `wrapper` (a `Decoder` or `Model`) to the ExecuTorch program `file`.

    `im`: `[b, 3, h, w]` example input; the program is fixed to its shape. Returns `file`. Raises
    `MissingPackageError` without executorch and `ExecuTorchExportError` when export or lowering fails.
    """
    exir = require_package("executorch.exir", "executorch")
    xnnpack = require_package("executorch.backends.xnnpack.partition.xnnpack_partitioner", "executorch")
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    maps = HeadMaps(wrapper).eval()
    consts = {METADATA_METHOD: metadata_tensor(with_anchors(metadata, wrapper))}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            program = torch.export.export(maps, (torch.zeros_like(im),))
            lowered = exir.to_edge_transform_and_lower(program, partitioner=[xnnpack.XnnpackPartitioner()],
                                                       constant_methods=consts)
            data = lowered.to_executorch().buffer
    except Exception as e:  # noqa: BLE001  (torch.export and EXIR raise many types: report one line)
        text = str(e).strip()
        raise ExecuTorchExportError(f"{file}: ExecuTorch could not lower the model: {type(e).__name__}: "
                                    f"{text.splitlines()[0] if text else ''}") from None
    fd, tmp = tempfile.mkstemp(prefix=f".{file.name}.", suffix=".tmp", dir=file.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, file)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return file
