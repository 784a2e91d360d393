"""Decoding of the Detect head's raw maps into boxes in network-input pixels.

The head stays a pure `nn.Module` returning logits (see docs/CONTRACTS.md); decoding lives here so that
loss, validation and export all start from the same raw maps. `Decoder` wraps a model for export and for
backends that want a single `[B, N, 5 + nc]` tensor out.
"""
from __future__ import annotations

import functools

import torch
from torch import nn


def _check_maps(maps: list[torch.Tensor], anchors: torch.Tensor, strides: torch.Tensor) -> None:
    if not isinstance(maps, (list, tuple)) or not maps:
        raise ValueError(f"decode: expected a non-empty list of raw maps, got {type(maps).__name__}")
    if anchors.dim() != 3 or anchors.shape[0] != len(maps) or anchors.shape[2] != 2:
        raise ValueError(f"decode: anchors must be [nl={len(maps)}, na, 2] pixels, got {tuple(anchors.shape)}")
    if strides.numel() != len(maps):
        raise ValueError(f"decode: {len(maps)} maps but {strides.numel()} strides")
    for i, m in enumerate(maps):
        if m.dim() != 5 or m.shape[1] != anchors.shape[1] or m.shape[-1] < 6:
            raise ValueError(f"decode: map {i} must be [B, na={anchors.shape[1]}, H, W, 5+nc], got {tuple(m.shape)}")


def decode(maps: list[torch.Tensor], anchors: torch.Tensor, strides: torch.Tensor) -> torch.Tensor:
    """Raw head maps -> `[B, N, 5 + nc]` with columns `cx, cy, w, h, obj, cls_0..cls_{nc-1}`.

    `maps[i]`: `[B, na, H_i, W_i, 5 + nc]` logits; `anchors`: `[nl, na, 2]` in pixels; `strides`: `[nl]`.
    Box columns are pixels of the network input, `obj` and `cls_*` probabilities (sigmoid).
    Rows run level by level, then anchor, then grid row, then grid column (N = sum na * H_i * W_i).
    Rule (YOLOv5 v6): `xy = (2 s - 0.5 + grid) * stride`, `wh = (2 s)^2 * anchor`, with s = sigmoid(raw).
    While tracing/exporting, or when gradients flow, it is written with out-of-place ops only (clean
    ONNX/TorchScript graphs); otherwise it writes each level straight into the output: same arithmetic
    (bit-identical at batch 1, within an ulp otherwise), and it skips the copies of sigmoid + cat + cat.
    """
    _check_maps(maps, anchors, strides)
    exporting = torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()
    if exporting or (torch.is_grad_enabled() and any(m.requires_grad for m in maps)):
        return _decode_traceable(maps, anchors, strides)
    return _decode_into(maps, anchors, strides)


def _decode_traceable(maps: list[torch.Tensor], anchors: torch.Tensor, strides: torch.Tensor,
                      planes: bool | None = None) -> torch.Tensor:
    """Out-of-place `decode`, row by row ([B, na, H, W, no]) or, with `planes`, channel-major
    ([B, na, no, H*W]) until the last step; `planes=None` picks planes inside `torch.onnx.export` only.

    In an ONNX graph the planes form's permute cancels the head's own (ONNX Runtime drops both), its
    slices and cat move whole H*W planes instead of 2-, 2- and 81-float pieces of every row, and the
    Sigmoid, first, fuses into the head conv (utils.export.graph.sigmoid_first): less time per frame in
    ONNX Runtime, same outputs (benchmarks/onnx_layout.py; figures in docs/PERFORMANCE.md). In PyTorch the channels_last maps are row-major already, and planes were slower (TorchScript).
    """
    planes = torch.onnx.is_in_onnx_export() if planes is None else planes
    dim = 2 if planes else -1  # the 5 + nc axis
    out = []
    for i, m in enumerate(maps):
        b, na, h, w, no = m.shape
        s = m.sigmoid()
        ys = torch.arange(h, device=m.device, dtype=s.dtype)
        xs = torch.arange(w, device=m.device, dtype=s.dtype)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        anchor = anchors[i].to(device=m.device, dtype=s.dtype)
        stride = strides[i].to(device=m.device, dtype=s.dtype)
        if planes:
            s = s.permute(0, 1, 4, 2, 3).reshape(b, na, no, h * w)
            grid, anchor = torch.stack((gx, gy), 0).view(1, 1, 2, h * w), anchor.view(1, na, 2, 1)
        else:
            grid, anchor = torch.stack((gx, gy), -1).view(1, 1, h, w, 2), anchor.view(1, na, 1, 1, 2)
        xy = (s.narrow(dim, 0, 2) * 2 - 0.5 + grid) * stride
        wh = (s.narrow(dim, 2, 2) * 2) ** 2 * anchor
        d = torch.cat((xy, wh, s.narrow(dim, 4, no - 4)), dim)
        out.append((d.transpose(2, 3) if planes else d).reshape(b, na * h * w, no))
    return torch.cat(out, 1)


@functools.lru_cache(maxsize=32)
def _grid(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`[1, 1, h, w, 2]` cell (x, y) indices; cached because every frame of a video asks for the same."""
    gy, gx = torch.meshgrid(torch.arange(h, device=device, dtype=dtype),
                            torch.arange(w, device=device, dtype=dtype), indexing="ij")
    return torch.stack((gx, gy), -1).view(1, 1, h, w, 2)


def _decode_into(maps: list[torch.Tensor], anchors: torch.Tensor, strides: torch.Tensor) -> torch.Tensor:
    """`decode` for inference: sigmoid of each level lands in its slice of the output, boxes in place."""
    b, no = maps[0].shape[0], maps[0].shape[-1]
    sizes = [m.shape[1] * m.shape[2] * m.shape[3] for m in maps]
    out = torch.empty((b, sum(sizes), no), device=maps[0].device, dtype=maps[0].dtype)
    start = 0
    for i, (m, n) in enumerate(zip(maps, sizes)):
        _, na, h, w, _ = m.shape
        v = out[:, start:start + n].view(b, na, h, w, no)
        torch.sigmoid(m, out=v)
        anchor = anchors[i].to(device=m.device, dtype=v.dtype).view(1, na, 1, 1, 2)
        stride = strides[i].to(device=m.device, dtype=v.dtype)
        v[..., 0:2].mul_(2).sub_(0.5).add_(_grid(h, w, m.device, v.dtype)).mul_(stride)
        v[..., 2:4].mul_(2).pow_(2).mul_(anchor)
        start += n
    return out


class Decoder(nn.Module):
    """`model(x)` raw maps -> decoded `[B, N, 5 + nc]` (see `decode`); the export/inference wrapper.

    Reads anchors and strides from `model.detect` at each call, so a fused or EMA-swapped model still
    decodes with its own buffers.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if getattr(model, "detect", None) is None:
            raise ValueError("Decoder needs a detection model with a `detect` head (got a classifier?)")
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        det = self.model.detect
        return decode(self.model(x), det.anchors, det.stride)
