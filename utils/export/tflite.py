"""TFLite export through litert-torch: `best_float32.tflite` and, with calibration, `best_int8.tflite`.

The graph ends at the head's 1x1 convs (`utils.export.headmaps.HeadMaps`); decoding stays outside, in
float, in the runner (`utils.infer.formats.tflite.TFLiteRunner`): quantizing the box decode costs about
0.2 mAP50. Input and outputs are channels-last (`litert_torch.to_channel_last_io`), TFLite's own layout,
so no transposes are left at the ends of the graph: input `[b, h, w, 3]` float 0..1, outputs
`[b, H_i, W_i, na * no]` logits per level.

INT8 (`export_tflite(..., calibration=batches)`): the float file is quantized by ai-edge-quantizer's
static recipe (int8 weights per channel, int8 activations per tensor, calibrated on `batches`), int8
input and outputs included; only h-swish stays float (`int8_recipe`). The runner quantizes the input and
dequantizes the maps with each tensor's scale and zero point, and decodes in float.

The metadata (`export_metadata`'s raw string mapping, plus `anchors`) is embedded in the flatbuffer's
own `metadata` table under `METADATA_NAME`, so the single file carries it wherever it is copied;
`read_tflite_metadata` reads it back. Files are written to a temp name and moved into place.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from utils.core.errors import UserError
from utils.core.paths import atomic_write_bytes
from utils.export.headmaps import HeadMaps, require_package, unwrap, with_anchors

METADATA_NAME = "mobileyolo"  # name of our entry in the TFLite model's metadata table
TFLITE_IDENTIFIER = b"TFL3"  # flatbuffer file identifier of every .tflite model


class TFLiteExportError(UserError, RuntimeError):
    """litert-torch or ai-edge-quantizer failed on the model."""


def tflite_file(weights: str | Path, int8: bool = False, outdir: str | Path | None = None) -> Path:
    """YOLOv5's name for a TFLite export of `weights`: `<stem>_float32.tflite` or `<stem>_int8.tflite`."""
    weights = Path(weights)
    return Path(outdir or weights.parent) / f"{weights.stem}_{'int8' if int8 else 'float32'}.tflite"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """For one conversion, hide litert-torch's per-stage progress lines and the INFO records that it,
    JAX and ai-edge-quantizer send to the root logger ("Use JAX lowering: ..."); both are restored after."""
    key, old = "LITERT_TORCH_SHOW_PROGRESS", os.environ.get("LITERT_TORCH_SHOW_PROGRESS")
    disabled = logging.root.manager.disable
    os.environ[key] = "n"
    logging.disable(max(disabled, logging.INFO))
    try:
        yield
    finally:
        logging.disable(disabled)
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def convert_float(wrapper: nn.Module, im: torch.Tensor) -> bytes:
    """The float32 TFLite flatbuffer of `HeadMaps(wrapper)` for `im`'s shape (NCHW in), channels-last I/O."""
    litert_torch = require_package("litert_torch", "tflite")
    maps = HeadMaps(wrapper).eval()
    nl = int(unwrap(wrapper).detect.nl)
    module = litert_torch.to_channel_last_io(maps, args=[0], outputs=list(range(nl))).eval()
    x = torch.zeros_like(im).permute(0, 2, 3, 1).contiguous()
    try:
        with _quiet(), torch.no_grad():
            return bytes(litert_torch.convert(module, (x,)).model_content())
    except Exception as e:  # noqa: BLE001  (torch.export, MLIR, JAX... each raise their own types)
        raise TFLiteExportError(f"litert-torch could not convert the model: {type(e).__name__}: "
                                f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None


FLOAT_OPS = ("HARD_SWISH",)  # TFLite ops kept float in an INT8 export (see `int8_recipe`)


def int8_recipe(aeq: object) -> list[dict]:
    """ai-edge-quantizer's static recipe (int8 weights per channel, int8 activations per tensor), except
    `FLOAT_OPS`: XNNPACK does not take an int8 HARD_SWISH, so each one split the delegated graph (31
    partitions instead of 3 for MobileNetV3-Small-YOLO) and ran in TFLite's reference kernels, 4x slower
    than float32; with h-swish in float between dequantize/quantize pairs XNNPACK runs the whole graph."""
    recipe = list(aeq.recipe.static_wi8_ai8())
    return recipe + [{"regex": ".*", "operation": op, "algorithm_key": "no_quantize"} for op in FLOAT_OPS]


def quantize_int8(float_model: bytes, calibration: Iterable[np.ndarray]) -> bytes:
    """Full-integer static INT8 (int8 weights and activations) of a float TFLite model from `convert_float`.

    `calibration`: float32 `[b, 3, h, w]` 0..1 arrays of the export's shape (letterboxed images).
    """
    aeq = require_package("ai_edge_quantizer", "tflite --int8")
    interpreter = require_package("ai_edge_litert.interpreter", "tflite").Interpreter(model_content=float_model)
    key, signature = next(iter(interpreter.get_signature_list().items()))
    batch = int(interpreter.get_input_details()[0]["shape"][0])
    # one NHWC image per row, regrouped into the model's own (fixed) batch size
    images = [im for b in calibration for im in np.asarray(b, np.float32).transpose(0, 2, 3, 1)]
    samples = [{signature["inputs"][0]: np.ascontiguousarray(np.stack(images[i:i + batch]))}
               for i in range(0, len(images) - batch + 1, batch)]
    if not samples:
        raise TFLiteExportError(f"--int8: {len(images)} calibration image(s), the model's batch is {batch}")
    try:
        qt = aeq.quantizer.Quantizer(float_model, int8_recipe(aeq))
        with _quiet(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "experimental_preserve_all_tensors ... debugging"
            calibrated = qt.calibrate({key: samples})  # keeps its progress bar: ~0.2 s per image
            result = qt.quantize(calibrated, enable_progress_bar=False, enable_progress_report=False)
    except Exception as e:  # noqa: BLE001  (ai-edge-quantizer raises its own types for unsupported graphs)
        raise TFLiteExportError(f"ai-edge-quantizer failed: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    return bytes(result.quantized_model)


def strip_tensor_names(obj: object) -> None:
    """Drop the names of a TFLite model object's inner tensors (long traced module paths: ~7% of an INT8
    file); the graph's inputs and outputs keep theirs, and signatures refer to tensors by index."""
    for graph in obj.subgraphs:
        keep = set(graph.inputs or []) | set(graph.outputs or [])
        for i, tensor in enumerate(graph.tensors):
            if i not in keep:
                tensor.name = None


def embed_metadata(model: bytes, metadata: dict[str, str]) -> bytes:
    """`model` with `metadata` (str -> str) stored as JSON in its metadata table under `METADATA_NAME`
    (and inner tensor names stripped: `strip_tensor_names`)."""
    fb = require_package("ai_edge_litert.tools.flatbuffer_utils", "tflite")
    schema = require_package("ai_edge_litert.schema_py_generated", "tflite")
    obj = fb.read_model_from_bytearray(bytearray(model))
    strip_tensor_names(obj)
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(json.dumps(metadata, sort_keys=True).encode(), dtype=np.uint8).copy()
    obj.buffers.append(buffer)
    entries = [m for m in (obj.metadata or []) if m.name not in (METADATA_NAME, METADATA_NAME.encode())]
    entry = schema.MetadataT()
    entry.name, entry.buffer = METADATA_NAME, len(obj.buffers) - 1
    obj.metadata = [*entries, entry]
    return bytes(fb.convert_object_to_bytearray(obj))


def read_tflite_metadata(model: bytes) -> dict[str, str] | None:
    """The mapping `embed_metadata` stored; None when `model` has none. Raises `ValueError` when
    `model` is not a TFLite flatbuffer or its metadata entry is unreadable (truncated, corrupt)."""
    schema = require_package("ai_edge_litert.schema_py_generated", "tflite")
    if len(model) < 8 or model[4:8] != TFLITE_IDENTIFIER:
        raise ValueError("not a TFLite model (no TFL3 identifier)")
    try:
        root = schema.Model.GetRootAs(model, 0)
        for i in range(root.MetadataLength()):
            entry = root.Metadata(i)
            if entry.Name() == METADATA_NAME.encode():
                data = root.Buffers(entry.Buffer()).DataAsNumpy()
                meta = json.loads(bytes(data).decode()) if not isinstance(data, int) else None
                if not isinstance(meta, dict):
                    raise ValueError("metadata entry is not a mapping")
                return {str(k): str(v) for k, v in meta.items()}
    except (IndexError, AttributeError, UnicodeDecodeError, json.JSONDecodeError, TypeError, struct.error) as e:
        raise ValueError(f"unreadable metadata ({type(e).__name__})") from None
    return None


def export_tflite(wrapper: nn.Module, im: torch.Tensor, file: str | Path, metadata: dict[str, str],
                  calibration: Iterable[np.ndarray] | None = None) -> Path:
    """Export the detector inside `wrapper` (a `Decoder` or `Model`) to the TFLite file `file`.

    `im`: `[b, 3, h, w]` example input; the file is fixed to that shape (the runner resizes the batch
    dimension). With `calibration` (see `quantize_int8`) the file is full-integer INT8. The metadata
    written is `metadata` plus `anchors`. Returns `file`. Raises `MissingPackageError` without
    litert-torch / ai-edge-quantizer and `TFLiteExportError` when conversion fails.
    """
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    model = convert_float(wrapper, im)
    if calibration is not None:
        model = quantize_int8(model, calibration)
    data = embed_metadata(model, with_anchors(metadata, wrapper))
    return atomic_write_bytes(file, data)
