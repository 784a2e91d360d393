"""ExecuTorch export: `best.pte`, the network lowered to the XNNPACK backend (float32; `best_int8.pte`
with calibration: PT2E static INT8 for XNNPACK).

As for NCNN and TFLite, the graph ends at the head's 1x1 convs (`utils.export.headmaps.HeadMaps`: one
`[b, na * no, H_i, W_i]` map per level) and the runner (`utils.infer.formats.executorch`) decodes with our
own decoder. `torch.export` fixes the program to the example input's shape (batch and size); the runner
runs other batch sizes in chunks. The metadata (`export_metadata`'s raw string mapping plus `anchors`)
is a constant method of the program, `METADATA_METHOD`, returning its JSON as a uint8 tensor, so the one
`.pte` file carries it. The file is written to a temp name and moved into place.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from utils.core.errors import UserError
from utils.core.paths import atomic_write_bytes
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


def pte_int8_file(weights: str | Path, outdir: str | Path | None = None) -> Path:
    """Name of the INT8 ExecuTorch export of `weights`: `<stem>_int8.pte` (as `<stem>_int8.tflite`)."""
    weights = Path(weights)
    return Path(outdir or weights.parent) / f"{weights.stem}_int8.pte"


def quantize_pt2e(module: nn.Module, im: torch.Tensor, calibration: Iterable[np.ndarray]) -> nn.Module:
    """`module` (torch.export'ed at `im`'s shape) with XNNPACK's static INT8 scheme: int8 weights per
    channel, int8 activations per tensor, calibrated on `calibration` (float32 `[b, 3, h, w]` 0..1 arrays
    of the export's shape), as PT2E (torchao) inserts and folds them.

    Activations use min/max observers: the quantizer's default histogram observer costs ~2 s per
    320x320 image here (100 calibration images: minutes), and min/max is what the TFLite path uses too.
    """
    xq = require_package("executorch.backends.xnnpack.quantizer.xnnpack_quantizer", "executorch --int8")
    pt2e = require_package("torchao.quantization.pt2e.quantize_pt2e", "executorch --int8")
    observer = require_package("torchao.quantization.pt2e.observer", "executorch --int8")
    config = xq.get_symmetric_quantization_config(is_per_channel=True)
    act = dataclasses.replace(config.input_activation,
                              observer_or_fake_quant_ctr=observer.MinMaxObserver.with_args(eps=2 ** -12))
    config = dataclasses.replace(config, input_activation=act, output_activation=act)
    prepared = pt2e.prepare_pt2e(torch.export.export(module, (torch.zeros_like(im),)).module(),
                                 xq.XNNPACKQuantizer().set_global(config))
    batch, seen = int(im.shape[0]), 0
    images = [img for b in calibration for img in np.asarray(b, np.float32)]
    for i in range(0, len(images) - batch + 1, batch):
        prepared(torch.from_numpy(np.stack(images[i:i + batch])))
        seen += 1
    if not seen:
        raise ExecuTorchExportError(f"--int8: {len(images)} calibration image(s), the export batch is {batch}")
    return pt2e.convert_pt2e(prepared)


def export_executorch(wrapper: nn.Module, im: torch.Tensor, file: str | Path, metadata: dict[str, str],
                      calibration: Iterable[np.ndarray] | None = None) -> Path:
    """Export the detector inside `wrapper` (a `Decoder` or `Model`) to the ExecuTorch program `file`.

    `im`: `[b, 3, h, w]` example input; the program is fixed to its shape. With `calibration` the
    program is INT8 (`quantize_pt2e`; float32 in and out, decode in float in the runner). Returns `file`.
    Raises `MissingPackageError` without executorch and `ExecuTorchExportError` when export or lowering
    fails.
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
            if calibration is not None:
                maps = quantize_pt2e(maps, im, calibration)
            program = torch.export.export(maps, (torch.zeros_like(im),))
            lowered = exir.to_edge_transform_and_lower(program, partitioner=[xnnpack.XnnpackPartitioner()],
                                                       constant_methods=consts)
            data = lowered.to_executorch().buffer
    except (UserError, ImportError):
        raise
    except Exception as e:  # noqa: BLE001  (torch.export, PT2E and EXIR raise many types: report one line)
        text = str(e).strip()
        raise ExecuTorchExportError(f"{file}: ExecuTorch could not lower the model: {type(e).__name__}: "
                                    f"{text.splitlines()[0] if text else ''}") from None
    return atomic_write_bytes(file, data)
