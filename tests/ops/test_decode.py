"""utils.ops.decode: the YOLOv5 v6 decoding rule, row order, the Decoder wrapper and bad input."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from utils.ops.decode import Decoder, decode

ANCHORS = torch.tensor([[[10.0, 13.0], [16.0, 30.0]], [[30.0, 61.0], [62.0, 45.0]]])  # [nl=2, na=2, 2] px
STRIDES = torch.tensor([8.0, 16.0])


def maps_for(b=1, nc=3, size=32, fill=0.0):
    return [torch.full((b, 2, size // int(s), size // int(s), 5 + nc), fill) for s in STRIDES]


def test_zero_logits_decode_to_cell_centres_and_anchors():
    out = decode(maps_for(), ANCHORS, STRIDES)
    assert out.shape == (1, 2 * 4 * 4 + 2 * 2 * 2, 8)
    # s = 0.5 everywhere: xy = (0.5 + grid) * stride, wh = anchor, obj = cls = 0.5
    first = out[0, 0]
    torch.testing.assert_close(first, torch.tensor([4.0, 4.0, 10.0, 13.0, 0.5, 0.5, 0.5, 0.5]))
    assert torch.allclose(out[..., 4:], torch.tensor(0.5))


def test_row_order_level_anchor_y_x_and_formula():
    maps = maps_for(b=2)
    raw = torch.tensor([0.3, -1.2, 0.7, -0.4, 2.0, -3.0, 1.0, 0.1])
    maps[1][1, 1, 0, 1] = raw  # batch 1, level 1, anchor 1, grid y=0, x=1
    out = decode(maps, ANCHORS, STRIDES)
    row = 2 * 4 * 4 + 1 * 2 * 2 + 0 * 2 + 1
    s = raw.sigmoid()
    expect = torch.cat(((s[:2] * 2 - 0.5 + torch.tensor([1.0, 0.0])) * 16, (s[2:4] * 2) ** 2 * ANCHORS[1, 1], s[4:]))
    torch.testing.assert_close(out[1, row], expect)
    torch.testing.assert_close(out[0, row], decode(maps_for(), ANCHORS, STRIDES)[0, row])


def test_non_square_maps():
    maps = [torch.zeros(1, 2, 2, 4, 6), torch.zeros(1, 2, 1, 2, 6)]  # H != W
    out = decode(maps, ANCHORS, STRIDES)
    assert out.shape == (1, 16 + 4, 6)
    assert out[0, 3, :2].tolist() == [28.0, 4.0]  # y=0, x=3 on stride 8
    assert out[0, 4, :2].tolist() == [4.0, 12.0]  # y=1, x=0


class _Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("anchors", ANCHORS.clone())
        self.register_buffer("stride", STRIDES.clone())


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.detect = _Head()

    def forward(self, x):
        return [torch.zeros(x.shape[0], 2, x.shape[2] // 8, x.shape[3] // 8, 7),
                torch.zeros(x.shape[0], 2, x.shape[2] // 16, x.shape[3] // 16, 7)]


def test_decoder_wraps_a_model():
    out = Decoder(_Model())(torch.zeros(3, 3, 32, 64))
    assert out.shape == (3, 2 * 4 * 8 + 2 * 2 * 4, 7)
    with pytest.raises(ValueError, match="detect"):
        Decoder(nn.Identity())


def test_bad_input():
    with pytest.raises(ValueError, match="non-empty list"):
        decode(torch.zeros(1, 2, 4, 4, 8), ANCHORS, STRIDES)
    with pytest.raises(ValueError, match="anchors"):
        decode(maps_for(), ANCHORS[0], STRIDES)
    with pytest.raises(ValueError, match="strides"):
        decode(maps_for(), ANCHORS, STRIDES[:1])
    with pytest.raises(ValueError, match="map 1"):
        decode([maps_for()[0], torch.zeros(1, 3, 2, 2, 8)], ANCHORS, STRIDES)


def test_fast_decode_equals_the_traceable_one():
    from utils.ops.decode import _decode_traceable, decode

    g = torch.Generator().manual_seed(0)
    maps = [torch.randn(2, 3, h, w, 7, generator=g) * 4 for h, w in ((8, 12), (4, 6))]
    anchors, strides = torch.rand(2, 3, 2, generator=g) * 100, torch.tensor([8.0, 16.0])
    one = [m[:1] for m in maps]  # batch 1 (detect.py): same kernels, so bit for bit
    assert torch.equal(decode(one, anchors, strides), _decode_traceable(one, anchors, strides))
    # batch > 1 writes into strided slices, where the kernels may round one ulp differently
    torch.testing.assert_close(decode(maps, anchors, strides), _decode_traceable(maps, anchors, strides),
                               rtol=1e-6, atol=0.0)
    # the ONNX form (channel-major planes) computes the same numbers in another memory order
    torch.testing.assert_close(_decode_traceable(maps, anchors, strides, planes=True),
                               _decode_traceable(maps, anchors, strides), rtol=1e-6, atol=0.0)
    assert torch.equal(_decode_traceable(one, anchors, strides, planes=True), decode(one, anchors, strides))
    # with gradients flowing (training-time validation) decode stays differentiable
    grad_maps = [m.clone().requires_grad_(True) for m in maps]
    decode(grad_maps, anchors, strides).sum().backward()
    assert all(m.grad is not None and torch.isfinite(m.grad).all() for m in grad_maps)

