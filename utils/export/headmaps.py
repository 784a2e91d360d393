"""The export form of a detector for runtimes that decode outside the graph (NCNN, TFLite, ExecuTorch).

`HeadMaps(model)` runs the network up to and including the Detect head's 1x1 convs and returns their
outputs as plain 4-D maps, level by level: `[B, na * (5 + nc), H_i, W_i]` logits, channel `a * no + k`
holding anchor `a`'s column `k` (the order `Detect.forward` views them in). Nothing 5-D, no `narrow`,
no decode: the runner decodes with our own decoder (`utils.infer.formats.common.decode_maps`, anchors and
strides from the metadata), so box arithmetic stays float32 even in an INT8 export.
"""
from __future__ import annotations

import importlib
import json
from types import ModuleType

import torch
from torch import nn

from models.yolo import row_input
from utils.core.errors import UserError

REQUIREMENTS = "requirements-export.txt"


class MissingPackageError(UserError, ImportError):
    """An optional exporter package (pnnx, litert-torch, ...) is not installed."""


def require_package(package: str, fmt: str) -> ModuleType:
    """Import the optional `package` for exporting `fmt`; a missing one is a one-line `MissingPackageError`."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise MissingPackageError(f"--include {fmt} needs {package.split('.')[0]}: "
                                  f"pip install -r {REQUIREMENTS}") from None


def unwrap(model: nn.Module) -> nn.Module:
    """The detection `Model` inside `model` (a `utils.ops.decode.Decoder` or the model itself)."""
    inner = getattr(model, "model", None)
    if getattr(model, "detect", None) is None and inner is not None:
        model = inner
    if getattr(model, "detect", None) is None:
        raise ValueError("export: expected a detection Model (or a Decoder around one)")
    return model


class HeadMaps(nn.Module):
    """`model(x)` up to the head's convs: a tuple of `nl` maps `[B, na * no, H_i, W_i]` (see module doc)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = unwrap(model)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        model, saved = self.model, {}
        for m in model.layers:
            x = row_input(m, x, saved)
            if m is model.detect:
                return tuple(conv(t) for conv, t in zip(m.m, x))
            x = m(x)
            if m.i in model.save:
                saved[m.i] = x
        raise RuntimeError("HeadMaps: the model has no Detect row")  # unreachable for a detector


def with_anchors(metadata: dict[str, str], model: nn.Module, **override: object) -> dict[str, str]:
    """`metadata` plus the head's `anchors` (pixels) when missing, and `override` values JSON-encoded."""
    meta = dict(metadata)
    if "anchors" not in meta:
        meta["anchors"] = json.dumps(unwrap(model).detect.anchors.tolist())
    meta.update({k: json.dumps(v) for k, v in override.items()})
    return meta
