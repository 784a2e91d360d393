"""NCNN runner for `best_ncnn_model/` (or its `.param` file), with the `ncnn` Python package.

The graph ends at the head's 1x1 convs (`utils.export.headmaps.HeadMaps`); each output is one level's
`[na * no, H, W]` map and `decode_maps` decodes them with our decoder, anchors and strides read from the
folder's `metadata.yaml`. ncnn runs one image per extractor, so a batch is fed image by image; the graph
takes any input size. fp16/bf16 storage and arithmetic are switched off: ncnn picks them by default on
CPUs that have them, and boxes then move by a tenth of a pixel or more (as OpenVINO's bf16 does).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from utils.export.metadata import read_metadata_yaml
from utils.infer.formats.common import (
    BackendError,
    decode_maps,
    find_model_file,
    metadata_value,
    require,
)

NCNN_MAGIC = "7767517"  # the first line of every ncnn .param file


class NCNNRunner:
    """Run one NCNN export (contract: docs/CONTRACTS.md, "Formats").

    `path`: the `*_ncnn_model/` folder or its `.param` file (the `.bin` beside it has the same stem).
    `threads`: ncnn's worker threads (default physical cores). Attributes `file` (the `.param`),
    `metadata` (raw strings from `metadata.yaml`), `batch` None, `dynamic` True.
    """

    def __init__(self, path: Path, threads: int | None = None) -> None:
        ncnn = require("ncnn", "NCNN", path)
        self.file = find_model_file(path, ".param")
        weights = self.file.with_suffix(".bin")
        if not weights.is_file():
            raise BackendError(f"{weights}: weights file of {self.file.name} not found")
        try:
            self.metadata = read_metadata_yaml(self.file.parent)
        except ValueError as e:
            raise BackendError(str(e)) from None
        metadata_value(self.metadata, "anchors", self.file.parent / "metadata.yaml")  # needed to decode
        with open(self.file, encoding="utf-8", errors="replace") as f:
            if f.readline().strip() != NCNN_MAGIC:
                raise BackendError(f"{self.file}: not an ncnn .param file (no {NCNN_MAGIC} magic)")
        self.net = ncnn.Net()
        opt = self.net.opt
        opt.num_threads = int(threads or os.cpu_count() or 1)
        opt.use_vulkan_compute = False
        for name in ("use_fp16_storage", "use_fp16_packed", "use_fp16_arithmetic", "use_bf16_storage"):
            if hasattr(opt, name):
                setattr(opt, name, False)
        if self.net.load_param(str(self.file)) != 0:
            raise BackendError(f"{self.file}: ncnn cannot parse this .param file (corrupt or truncated?)")
        if self.net.load_model(str(weights)) != 0:
            raise BackendError(f"{weights}: ncnn cannot read the weights (corrupt or truncated?)")
        self.input_names, self.output_names = list(self.net.input_names()), list(self.net.output_names())
        if len(self.input_names) != 1 or not self.output_names:
            raise BackendError(f"{self.file}: expected one input and the head's maps as outputs, got "
                               f"{self.input_names} -> {self.output_names}")
        self._mat = ncnn.Mat
        self.batch, self.dynamic = None, True

    def __call__(self, arr: np.ndarray) -> np.ndarray:
        """float32 `[B, 3, H, W]` 0..1 -> decoded float32 `[B, N, 5 + nc]`."""
        per_output: list[list[np.ndarray]] = [[] for _ in self.output_names]
        for img in np.asarray(arr, dtype=np.float32):
            img = np.ascontiguousarray(img)  # ncnn.Mat borrows this memory: keep it alive through extract
            ex = self.net.create_extractor()
            mat = self._mat(img)
            ex.input(self.input_names[0], mat)
            for k, name in enumerate(self.output_names):
                ret, out = ex.extract(name)
                if ret != 0:
                    raise BackendError(f"{self.file}: ncnn failed on output {name} (error {ret})")
                per_output[k].append(np.array(out, dtype=np.float32))  # a copy: `out` lives in `ex`
        maps = [np.stack(level) for level in per_output]
        return decode_maps(maps, self.metadata, self.file)
