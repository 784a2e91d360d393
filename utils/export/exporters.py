"""Writers for the export formats: ONNX (TorchScript-based exporter, `dynamo=False`) and TorchScript.

Both take the *decoding* wrapper (`utils.ops.decode.Decoder` around a fused model), so the exported graph
has one input `images [b, 3, h, w]` (float 0..1) and one output `output0 [b, N, 5 + nc]` (cx, cy, w, h
in input pixels, obj, class probabilities). The metadata from `utils.export.metadata.export_metadata` (names,
strides, imgsz, ...) goes into ONNX `metadata_props` or the TorchScript extra file `config.json`, which
is where `DetectBackend` reads it back. Files are written to a temp name and then moved into place, so
an interrupted export never leaves a half-written model behind.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from utils.export.graph import GRAPH_PASSES, LAYOUT_PASSES, static_se
from utils.export.metadata import METADATA_FILE

LOGGER = logging.getLogger("mobileyolo.export")
INPUT_NAME, OUTPUT_NAME = "images", "output0"


def _tmp_path(file: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{file.name}.", suffix=".tmp", dir=file.parent)
    os.close(fd)
    return Path(tmp)


def export_onnx(wrapper: nn.Module, im: torch.Tensor, file: str | Path, metadata: dict[str, str],
                opset: int = 17, dynamic: bool = False, simplify: bool = False,
                layout: Iterable[str] | None = None) -> Path:
    """Export `wrapper` (input `im` [b, 3, h, w]) to ONNX at `file` and return the path.

    With `dynamic`, batch, height and width are symbolic (`batch`, `height`, `width`); otherwise the
    graph is fixed to `im`'s shape (and squeeze-excite exports in ONNX Runtime's fast layout, see
    `utils.export.graph`). `layout` names the `utils.export.graph.LAYOUT_PASSES` to apply (default: all;
    `()` for the plain graph, as benchmarks/onnx_layout.py compares). `simplify` runs onnxsim when
    installed (warns and skips when not).
    The graph is checked with `onnx.checker` before it is moved into place.
    """
    import onnx

    layout = LAYOUT_PASSES if layout is None else tuple(layout)
    unknown = sorted(set(layout) - set(LAYOUT_PASSES))
    if unknown:
        raise ValueError(f"export_onnx: unknown layout pass(es) {unknown}; choose from {list(LAYOUT_PASSES)}")
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    axes = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}, OUTPUT_NAME: {0: "batch", 1: "anchors"}}
    tmp = _tmp_path(file)
    try:
        with warnings.catch_warnings():
            # the TorchScript-based exporter is "legacy" but is the one that keeps fused convs and
            # HardSwish/HardSigmoid as single native ops; its deprecation/tracer warnings are expected
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # a fixed-size graph can carry the NCHWc-friendly SE form (utils/export/graph.py)
            module = static_se(wrapper) if "static_se" in layout and not dynamic else wrapper
            torch.onnx.export(module.eval(), (im,), str(tmp), opset_version=int(opset), dynamo=False,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes=axes if dynamic else None, do_constant_folding=True)
        model = onnx.load(str(tmp))
        for name, graph_pass in GRAPH_PASSES.items():
            if name in layout:
                graph_pass(model)
        if simplify:
            model = _simplify(model)
        del model.metadata_props[:]
        for k, v in metadata.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = k, v
        onnx.checker.check_model(model)
        onnx.save(model, str(tmp))
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)
    return file


def _simplify(model: onnx.ModelProto) -> onnx.ModelProto:  # noqa: F821 - onnx imported lazily
    try:
        import onnxsim
    except ImportError:
        LOGGER.warning("--simplify: onnxsim is not installed (pip install onnxsim); exporting unsimplified")
        return model
    simplified, ok = onnxsim.simplify(model)
    if not ok:
        LOGGER.warning("--simplify: onnxsim could not validate the simplified graph; keeping the original")
        return model
    return simplified


def export_torchscript(wrapper: nn.Module, im: torch.Tensor, file: str | Path, metadata: dict[str, str]) -> Path:
    """Trace `wrapper` on `im` and save it to `file` with `metadata` as the extra file `config.json`.

    The tracer records the decode grid sizes as `aten::size` ops, not constants, so the saved module
    runs at any batch and any stride-multiple size (tests/export/test_export.py checks this); callers should
    write `dynamic: true` into its metadata.
    """
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream but still works
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(wrapper.eval(), im, strict=False, check_trace=False)
        config = json.dumps({k: json.loads(v) for k, v in metadata.items()})
        tmp = _tmp_path(file)
        try:
            torch.jit.save(traced, str(tmp), _extra_files={METADATA_FILE: config})
            os.replace(tmp, file)
        finally:
            tmp.unlink(missing_ok=True)
    return file


def onnx_op_types(file: str | Path) -> dict[str, int]:
    """Count of each op type in an ONNX graph (e.g. `{'Conv': 52, 'HardSwish': 11, ...}`)."""
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(file)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
