"""OpenVINO export: `<stem>_openvino_model/` (`<stem>.xml`, `<stem>.bin`, `metadata.yaml`), float or INT8.

The IR is the fused model up to the head's 1x1 convs (`[B, na*(5+nc), H, W]` per level); the runner
(`utils.infer.formats.openvino`) decodes with our decoder, so the decode is never quantized. Weights are
stored float32 (`save_model(compress_to_fp16=False)`) unless `half`; the runner compiles at f32 unless
the metadata says `precision: fp16`. INT8: NNCF post-training quantization over calibration batches
(`utils.export.calibrate`), the head's 1x1 convs optionally left float (`keep_head_float`).
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from utils.export.headmaps import HeadMaps, require_package, unwrap
from utils.export.metadata import write_metadata_yaml

LOGGER = logging.getLogger("mobileyolo.export")


def openvino_dir(weights: str | Path, outdir: str | Path | None = None, int8: bool = False) -> Path:
    """YOLOv5's folder name: `best_openvino_model/`, or `best_int8_openvino_model/` for INT8."""
    stem = Path(weights).stem + ("_int8" if int8 else "")
    return Path(outdir or Path(weights).parent) / f"{stem}_openvino_model"


def head_conv_patterns(model: nn.Module) -> list[str]:
    """Regex patterns (OpenVINO node names of a converted `Model`) of the Detect head's 1x1 convs."""
    det = model.detect
    return [rf".*layers\.{det.i}\.m\.{k}[/.].*" for k in range(det.nl)]


def export_openvino(model: nn.Module, im: torch.Tensor, folder: str | Path, metadata: dict[str, str],
                    dynamic: bool = False, half: bool = False, calib: list[np.ndarray] | None = None,
                    keep_head_float: bool = True) -> Path:
    """Convert the fused detection `model` (a `Model` or a `Decoder` around one; raw maps out) to OpenVINO IR in `folder`; returns `folder`.

    `im`: example input `[b, 3, h, w]`. `dynamic`: batch, height and width left symbolic. `half`: weights
    stored as fp16 and run at the CPU's reduced precision. `calib`: float32 batches for NNCF INT8
    post-training quantization (None: float). The folder is written beside the target and renamed into
    place, so an interrupted export leaves no half-written model. The metadata gets `anchors` and
    `precision` ('fp32', 'fp16', 'int8').
    """
    ov = require_package("openvino", "openvino")
    model = unwrap(model)
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings of the converter's TorchScript path
        # 4-D head conv maps out, as NCNN/TFLite: a 5-D view + permute in the IR was a float Transpose
        # OpenVINO ran even in INT8 models (docs/PERFORMANCE.md); decode_maps does it in the runner
        ov_model = ov.convert_model(HeadMaps(model).eval(), example_input=im,
                                    input=[(-1, 3, -1, -1) if dynamic else tuple(im.shape)])
    precision = "int8" if calib is not None else "fp16" if half else "fp32"
    if calib is not None:
        ov_model = _quantize(ov_model, calib, head_conv_patterns(model) if keep_head_float else [])
    meta = dict(metadata)
    meta["precision"] = json.dumps(precision)
    if "anchors" not in meta:
        meta["anchors"] = json.dumps(model.detect.anchors.tolist())
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        stem = folder.name.removesuffix("_openvino_model").removesuffix("_int8")  # YOLOv5: best.xml in both
        ov.save_model(ov_model, str(tmp / f"{stem}.xml"), compress_to_fp16=half and calib is None)
        write_metadata_yaml(meta, tmp)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _quantize(ov_model: object, calib: list[np.ndarray], ignored: list[str]) -> object:
    """NNCF post-training quantization (performance preset, symmetric) of `ov_model` over `calib`."""
    nncf = require_package("nncf", "openvino --int8")
    logging.getLogger("nncf").setLevel(logging.ERROR)  # NNCF's progress bars and INFO lines are noise here
    scope = nncf.IgnoredScope(patterns=ignored, validate=False) if ignored else None
    kwargs = {"ignored_scope": scope} if scope is not None else {}
    return nncf.quantize(ov_model, nncf.Dataset(calib), subset_size=len(calib), **kwargs)
