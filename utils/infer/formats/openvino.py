"""OpenVINO runner for `*_openvino_model/` folders (IR `.xml` + `.bin` + `metadata.yaml`) on the CPU.

The IR ends at the head's 1x1 convs; decoding happens here with our own decoder
(`utils.infer.formats.common.decode_maps`), so it stays float32 in INT8 models too.
Precision: OpenVINO picks bf16 on CPUs that have it, which moves boxes by a tenth of a pixel or more, so
the runner compiles with `INFERENCE_PRECISION_HINT` f32 unless the export asked for reduced precision
(`export.py --half`, metadata `precision: fp16`). INT8 models keep their quantized ops integer either way.

Every runner of a process shares one `ov.Core` (`shared_core`), kept until exit. Each Core's CPU plugin
installs its own alternate signal stack and, when destroyed out of creation order (or on another
thread), puts back one another plugin has already freed; the next Python signal handler on that thread
(SIGCHLD from torch's DataLoader workers, SIGINT) then dies with SIGSEGV (docs/RELIABILITY.md, "Runtimes
in one process").
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from types import ModuleType

import numpy as np

from utils.core.errors import first_line
from utils.export.metadata import METADATA_YAML, read_metadata_yaml
from utils.infer.formats.common import (
    BackendError,
    check_metadata,
    decode_maps,
    find_model_file,
    require,
)


@functools.lru_cache(maxsize=1)
def shared_core(ov: ModuleType) -> object:
    """The process's one `ov.Core` of the `openvino` module `ov` (the module docstring says why one)."""
    return ov.Core()


class OpenVINORunner:
    """Run one OpenVINO export (contract: docs/CONTRACTS.md, "Formats").

    `path`: the `*_openvino_model/` folder or its `.xml`. `threads`: `INFERENCE_NUM_THREADS` (default:
    OpenVINO's own choice). `profile`: compile with `PERF_COUNT` so `profile_rows()` lists each executed
    node's type, layer type and time after a call.
    """

    def __init__(self, path: Path, threads: int | None = None, profile: bool = False) -> None:
        ov = require("openvino", "OpenVINO", path)
        self.file = find_model_file(path, ".xml")
        folder = self.file.parent
        try:
            self.metadata = check_metadata(read_metadata_yaml(folder), folder / METADATA_YAML)
        except ValueError as e:
            raise BackendError(str(e)) from None
        bin_file = self.file.with_suffix(".bin")
        if not bin_file.is_file():
            raise BackendError(f"{bin_file}: weights file of {self.file.name} not found")
        core = shared_core(ov)
        try:
            model = core.read_model(str(self.file), str(bin_file))
        except Exception as e:  # OpenVINO raises RuntimeError subclasses for bad XML or short .bin files
            raise BackendError(f"{self.file}: not a valid OpenVINO IR ({first_line(e)})") from None
        precision = json.loads(self.metadata.get("precision", '"fp32"'))
        config: dict[str, object] = {"PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": bool(profile)}
        if precision != "fp16":
            config["INFERENCE_PRECISION_HINT"] = "f32"
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as e:
            raise BackendError(f"{self.file}: OpenVINO cannot compile it ({first_line(e)})") from None
        self.request = self.compiled.create_infer_request()
        shape = model.inputs[0].get_partial_shape()
        if len(model.inputs) != 1 or shape.rank.get_length() != 4:
            raise BackendError(f"{self.file}: expected one [b,3,h,w] input")
        self.dynamic = not (shape[2].is_static and shape[3].is_static)
        self.batch = shape[0].get_length() if shape[0].is_static else None
        self.precision = precision
        self.n_out = len(model.outputs)

    def __call__(self, arr: np.ndarray) -> np.ndarray:
        """float32 `[B, 3, H, W]` 0..1 -> decoded float32 `[B, N, 5 + nc]`."""
        self.request.infer({0: np.ascontiguousarray(arr, dtype=np.float32)})
        maps = [self.request.get_output_tensor(i).data.copy() for i in range(self.n_out)]
        return decode_maps(maps, self.metadata, self.file)

    def profile_rows(self) -> list[tuple[str, str, str, float]]:
        """(node name, node type, exec type e.g. 'jit_avx512_I8', real ms) per executed node of the last call."""
        return [(p.node_name, p.node_type, p.exec_type, p.real_time.total_seconds() * 1e3)
                for p in self.request.get_profiling_info()]
