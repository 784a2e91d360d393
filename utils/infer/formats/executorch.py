"""ExecuTorch runner for `best.pte` exports (XNNPACK-lowered), with `executorch.runtime`.

The program ends at the head's 1x1 convs (`utils.export.headmaps.HeadMaps`): one `[b, na * no, H, W]`
output per level, decoded by `decode_maps` with anchors and strides from the metadata that the program
itself returns (constant method `utils.export.executorch.METADATA_METHOD`). The program is fixed to its
export shape; other batch sizes run in chunks of the export batch, the last one zero-padded.
`threads` is not applied: ExecuTorch's XNNPACK thread pool is process-wide (sized to the performance
cores) and a runner changes no process-wide state.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from utils.core.errors import first_line
from utils.export.executorch import METADATA_METHOD
from utils.infer.formats.common import (
    BackendError,
    decode_maps,
    metadata_value,
    require,
)

PTE_MAGIC = b"ET"  # bytes 4:6 of every .pte (flatbuffer identifier "ET12" in ExecuTorch 1.x)


class ExecuTorchRunner:
    """Run one `.pte` export (contract: docs/CONTRACTS.md, "Formats").

    Attributes `file`, `metadata` (raw strings), `batch` None (any batch), `dynamic` False (export size
    only), `input_shape` (the program's `[b, 3, h, w]`).
    """

    def __init__(self, path: Path, threads: int | None = None) -> None:
        runtime = require("executorch.runtime", "ExecuTorch", path)
        self.file = Path(path)
        if not self.file.is_file():
            raise BackendError(f"{self.file}: ExecuTorch program not found")
        data = self.file.read_bytes()
        if len(data) < 8 or data[4:6] != PTE_MAGIC:  # checked here: the loader aborts the process on some junk
            raise BackendError(f"{self.file}: not an ExecuTorch program (no ET identifier; corrupt or truncated?)")
        try:
            program = runtime.Runtime.get().load_program(data)
            names = set(program.method_names)
            if METADATA_METHOD not in names or "forward" not in names:
                raise BackendError(f"{self.file}: no MobileYOLO metadata in this .pte; export it with "
                                   f"`python export.py --include executorch`")
            blob = program.load_method(METADATA_METHOD).execute([])[0]
            self.method = program.load_method("forward")
        except RuntimeError as e:  # the loader reports a bad header, truncation, a failed verification
            raise BackendError(f"{self.file}: ExecuTorch cannot load this program, corrupt or truncated? "
                               f"({first_line(e)})") from None
        self._program = program  # the methods borrow from it
        try:
            meta = json.loads(bytes(blob.numpy().astype(np.uint8)).decode())
        except (ValueError, AttributeError) as e:
            raise BackendError(f"{self.file}: unreadable metadata ({type(e).__name__})") from None
        if not isinstance(meta, dict):
            raise BackendError(f"{self.file}: unreadable metadata (not a mapping)")
        self.metadata = {str(k): str(v) for k, v in meta.items()}
        metadata_value(self.metadata, "anchors", self.file)  # needed to decode
        info = self.method.metadata
        if info.num_inputs() != 1 or len(info.input_tensor_meta(0).sizes()) != 4:
            raise BackendError(f"{self.file}: expected one [b, 3, h, w] input")
        self.input_shape = tuple(int(d) for d in info.input_tensor_meta(0).sizes())
        self.batch, self.dynamic = None, False

    def __call__(self, arr: np.ndarray) -> np.ndarray:
        """float32 `[B, 3, H, W]` 0..1 -> decoded float32 `[B, N, 5 + nc]`."""
        x = np.ascontiguousarray(arr, dtype=np.float32)
        if x.ndim != 4 or x.shape[1:] != self.input_shape[1:]:
            raise BackendError(f"{self.file}: input {tuple(x.shape)} differs from the export's "
                               f"[b, 3, {self.input_shape[2]}, {self.input_shape[3]}]")
        n, b = x.shape[0], self.input_shape[0]
        if n % b:
            x = np.concatenate((x, np.zeros((b - n % b, *x.shape[1:]), np.float32)))
        chunks = []
        for i in range(0, x.shape[0], b):
            outs = self.method.execute([torch.from_numpy(x[i:i + b])])
            chunks.append([o.numpy() for o in outs])
        maps = [np.concatenate(level)[:n] for level in zip(*chunks)]
        return decode_maps(maps, self.metadata, self.file)
