"""TFLite runner for `*_float32.tflite` / `*_int8.tflite` exports, with the LiteRT interpreter.

The graph ends at the head's 1x1 convs (`utils.export.headmaps.HeadMaps`), channels-last: input
`[b, h, w, 3]`, one `[b, H_i, W_i, na * no]` output per level; `decode_maps` decodes them in float with
our decoder, anchors and strides from the metadata embedded in the file (`utils.export.tflite`).
Inputs and outputs of another dtype (an int8 model converted with integer I/O) are quantized and
dequantized with the tensor's own scale and zero point. The file is fixed to its export size and
batch; other batch sizes run in chunks of the export batch.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from utils.core.errors import first_line
from utils.export.tflite import read_tflite_metadata
from utils.infer.formats.common import (
    BackendError,
    decode_maps,
    metadata_value,
    require,
)


class TFLiteRunner:
    """Run one `.tflite` export (contract: docs/CONTRACTS.md, "Formats").

    `threads`: the interpreter's threads (default physical cores; XNNPACK runs the graph). Attributes
    `file`, `metadata` (raw strings), `batch` None (any batch), `dynamic` False (export size only),
    `int8` (whether the graph holds quantized tensors).
    """

    def __init__(self, path: Path, threads: int | None = None) -> None:
        lite = require("ai_edge_litert.interpreter", "TFLite", path)
        self.file = Path(path)
        if not self.file.is_file():
            raise BackendError(f"{self.file}: TFLite file not found")
        data = self.file.read_bytes()
        try:
            meta = read_tflite_metadata(data)
        except ValueError as e:
            raise BackendError(f"{self.file}: {e} (corrupt or truncated?)") from None
        if meta is None:
            raise BackendError(f"{self.file}: no MobileYOLO metadata in this .tflite; export it with "
                               f"`python export.py --include tflite`")
        self.metadata = meta
        metadata_value(meta, "anchors", self.file)  # needed to decode
        try:
            self.interpreter = lite.Interpreter(model_path=str(self.file), num_threads=int(threads or os.cpu_count() or 1))
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise BackendError(f"{self.file}: LiteRT cannot load this model ({first_line(e)})") from None
        inputs = self.interpreter.get_input_details()
        if len(inputs) != 1 or len(inputs[0]["shape"]) != 4 or inputs[0]["shape"][-1] != 3:
            raise BackendError(f"{self.file}: expected one [b, h, w, 3] input, got "
                               f"{[tuple(d['shape']) for d in inputs]}")
        self._input = inputs[0]
        self.int8 = any(d["dtype"] in (np.int8, np.uint8) for d in self.interpreter.get_tensor_details())
        self.batch, self.dynamic = None, False

    def __call__(self, arr: np.ndarray) -> np.ndarray:
        """float32 `[B, 3, H, W]` 0..1 -> decoded float32 `[B, N, 5 + nc]`.

        The file's batch is fixed (squeeze-excite reshapes bake it in), so a batch of another size runs
        in chunks of the export batch, the last one padded with zeros.
        """
        arr = np.asarray(arr, dtype=np.float32)
        want = tuple(int(d) for d in self._input["shape"])
        if arr.ndim != 4 or (arr.shape[2], arr.shape[3], arr.shape[1]) != want[1:]:
            raise BackendError(f"{self.file}: input {tuple(arr.shape)} differs from the export's "
                               f"[b, 3, {want[1]}, {want[2]}]")
        x = np.ascontiguousarray(arr.transpose(0, 2, 3, 1))
        n, b = x.shape[0], want[0]
        if n % b:
            x = np.concatenate((x, np.zeros((b - n % b, *x.shape[1:]), np.float32)))
        chunks = [self._run(x[i:i + b]) for i in range(0, x.shape[0], b)]
        maps = [np.concatenate(level)[:n] for level in zip(*chunks)]
        return decode_maps(maps, self.metadata, self.file)

    def _run(self, x: np.ndarray) -> list[np.ndarray]:
        """One export-sized NHWC batch -> the head's maps, float32 NCHW (`[b, na*no, H, W]`, unambiguous
        for `decode_maps` even when H or W equals na*no)."""
        self.interpreter.set_tensor(self._input["index"], _quantize(x, self._input))
        self.interpreter.invoke()
        return [_dequantize(self.interpreter.get_tensor(d["index"]), d).transpose(0, 3, 1, 2)
                for d in self.interpreter.get_output_details()]


def _quantize(x: np.ndarray, detail: dict) -> np.ndarray:
    """`x` in the input tensor's dtype (float as is; int8/uint8 with its scale and zero point)."""
    dtype = detail["dtype"]
    if dtype == np.float32:
        return x
    scale, zero = detail["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale + zero), info.min, info.max).astype(dtype)


def _dequantize(y: np.ndarray, detail: dict) -> np.ndarray:
    if y.dtype == np.float32:
        return y
    scale, zero = detail["quantization"]
    return ((y.astype(np.float32) - zero) * scale).astype(np.float32)
