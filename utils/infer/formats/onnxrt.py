"""ONNX Runtime runner for our `.onnx` exports (float32 and `-int8.onnx`), CPU provider.

The graph already decodes (input `images [b,3,h,w]`, output `output0 [b, N, 5+nc]`); the metadata lives
in the model's `metadata_props`.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from utils.core.errors import first_line
from utils.infer.formats.common import BackendError, check_metadata, require


class ONNXRunner:
    """Run one `.onnx` export (contract: docs/CONTRACTS.md, "Formats").

    `threads`: intra-op threads (default physical cores). `spin`: whether ONNX Runtime's threads
    spin-wait between ops inside a run; they stop spinning when each run ends, so NMS and drawing get
    the cores back (`session_config` holds the config entries applied). `profile`: a file prefix to
    enable ONNX Runtime's profiler (`end_profiling()` writes the JSON trace).
    """

    def __init__(self, path: Path, threads: int | None = None, spin: bool = True,
                 profile: str | None = None) -> None:
        ort = require("onnxruntime", "ONNX", path)
        self.file = Path(path)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or os.cpu_count() or 1
        # Spinning threads answer the next op sooner, but left spinning after a run they steal the cores
        # from our own NMS and drawing (docs/PERFORMANCE.md), hence the stop after each run.
        self.session_config = ({"session.force_spinning_stop": "1"} if spin
                               else {"session.intra_op.allow_spinning": "0"})
        for key, value in self.session_config.items():
            opts.add_session_config_entry(key, value)
        opts.log_severity_level = 3  # errors only; ORT's warnings about initializers are noise here
        if profile:
            opts.enable_profiling, opts.profile_file_prefix = True, str(profile)
        try:
            self.session = ort.InferenceSession(str(self.file), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for invalid protobufs
            raise BackendError(f"{self.file}: not a valid ONNX model ({first_line(e)})") from None
        self.metadata = check_metadata(dict(self.session.get_modelmeta().custom_metadata_map), self.file)
        inp, outs = self.session.get_inputs(), self.session.get_outputs()
        if len(inp) != 1 or len(outs) != 1 or len(inp[0].shape) != 4 or len(outs[0].shape) != 3:
            raise BackendError(f"{self.file}: expected one [b,3,h,w] input and one [b,N,5+nc] output")
        self.input_name, self.output_name = inp[0].name, outs[0].name
        b, _, h, w = inp[0].shape
        self.dynamic = not all(isinstance(d, int) for d in (h, w))
        self.batch = b if isinstance(b, int) else None

    def __call__(self, arr: np.ndarray) -> np.ndarray:
        """float32 `[B, 3, H, W]` 0..1 -> decoded float32 `[B, N, 5 + nc]`."""
        return self.session.run([self.output_name], {self.input_name: arr})[0]
