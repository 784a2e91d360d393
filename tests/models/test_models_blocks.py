"""Every registered block: forward shape from a table of rows, and conv+BN fusion equality."""
from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from models.common import ConvBNAct
from models.parse import parse_model
from models.registry import REGISTRY

H = W = 16
A2 = [[10, 13, 16, 30], [30, 61, 62, 45]]  # two levels, two anchors each (pixels)

# (row module, input channels, args, number, expected output shape for a [1, c, 16, 16] input)
# For multi-input rows the input is fed twice (from [-1, 0]).
TABLE: list[tuple[str, int, list[Any], int, tuple[int, ...] | None]] = [
    ("Conv", 8, [16, 3, 2], 1, (1, 16, 8, 8)),
    ("Conv", 8, [16], 2, (1, 16, 16, 16)),
    ("DWConv", 8, [16, 3, 1], 1, (1, 16, 16, 16)),
    ("DWSConv", 8, [24, 3, 2, "relu"], 1, (1, 24, 8, 8)),
    ("Bottleneck", 16, [16], 2, (1, 16, 16, 16)),
    ("C3", 8, [16, False], 3, (1, 16, 16, 16)),
    ("SPPF", 16, [32, 5], 1, (1, 32, 16, 16)),
    ("Concat", 8, [1], 1, (1, 16, 16, 16)),
    ("nn.Upsample", 8, ["None", 2, "nearest"], 1, (1, 8, 32, 32)),
    ("h_sigmoid", 8, [], 1, (1, 8, 16, 16)),
    ("h_swish", 8, [], 1, (1, 8, 16, 16)),
    ("SELayer", 24, [], 1, (1, 24, 16, 16)),
    ("conv_bn_hswish", 3, [16, 2], 1, (1, 16, 8, 8)),
    ("conv_bn_hswish", 16, [32, 1, 1], 1, (1, 32, 16, 16)),
    ("MobileNetV3_InvertedResidual", 16, [24, 64, 3, 2, 0, 0], 1, (1, 24, 8, 8)),
    ("MobileNetV3_InvertedResidual", 16, [16, 16, 3, 1, 1, 1], 2, (1, 16, 16, 16)),
    ("StemBlock", 3, [32, 3, 2], 1, (1, 32, 4, 4)),
    ("ShuffleV2Block", 16, [32, 2], 1, (1, 32, 8, 8)),
    ("ShuffleV2Block", 32, [32, 1], 3, (1, 32, 16, 16)),
    ("Classify", 16, [5, 64], 1, (1, 5)),
    ("Detect", 8, [3, A2], 1, None),  # checked separately below (list output)
]


def build_row(name: str, c: int, args: list[Any], n: int) -> nn.Module:
    multi = name in ("Concat", "Detect")
    row = [[-1, 0] if multi else -1, n, name, args]
    cfg = {"nc": 3, "backbone": [[-1, 1, "h_swish", []], row]}  # row 0 keeps c channels
    layers, _, _ = parse_model(cfg, ch=c)
    return layers[1]


def run_row(m: nn.Module, name: str, x: torch.Tensor) -> Any:
    return m([x, x]) if name in ("Concat", "Detect") else m(x)


def randomize_bn(model: nn.Module) -> None:
    """Non-trivial BN statistics so fusion is actually exercised."""
    g = torch.Generator().manual_seed(0)
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            n = mod.num_features
            mod.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            mod.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            mod.bias.data.copy_(torch.rand(n, generator=g) - 0.5)


def test_table_covers_every_registered_class() -> None:
    covered = {REGISTRY[name] for name, *_ in TABLE}
    missing = {c.__name__ for c in REGISTRY.values()} - {c.__name__ for c in covered}
    assert not missing, f"add a TABLE row for {sorted(missing)}"


@pytest.mark.parametrize("name, c, args, n, shape", [t for t in TABLE if t[4] is not None],
                         ids=[f"{t[0]}-{i}" for i, t in enumerate(TABLE) if t[4] is not None])
def test_block_forward_shape_and_fuse(name: str, c: int, args: list[Any], n: int,
                                      shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    m = build_row(name, c, args, n)
    randomize_bn(m)
    m.eval()
    x = torch.rand(1, c, H, W)
    with torch.no_grad():
        y = run_row(m, name, x)
        assert tuple(y.shape) == shape
        for sub in m.modules():
            if isinstance(sub, ConvBNAct):
                sub.fuse()
        assert not any(isinstance(s, nn.BatchNorm2d) for s in m.modules())
        torch.testing.assert_close(run_row(m, name, x), y, atol=1e-5, rtol=1e-5)


def test_detect_raw_maps_and_buffers() -> None:
    m = build_row("Detect", 8, [3, A2], 1)
    assert m.anchors.shape == (2, 2, 2) and m.anchors[1, 0].tolist() == [30.0, 61.0]
    assert m.stride.shape == (2,) and (m.nc, m.nl, m.na, m.no) == (3, 2, 2, 8)
    x = [torch.rand(2, 8, 8, 6), torch.rand(2, 8, 4, 3)]
    for mode in (True, False):
        out = m.train(mode)(x)
        assert [tuple(o.shape) for o in out] == [(2, 2, 8, 6, 8), (2, 2, 4, 3, 8)]


def test_inverted_residual_structure_rules() -> None:
    no_expand = build_row("MobileNetV3_InvertedResidual", 16, [16, 16, 3, 1, 0, 0], 1)
    assert no_expand.expand is None and no_expand.se is None and no_expand.use_res
    expand = build_row("MobileNetV3_InvertedResidual", 16, [24, 72, 5, 2, 1, 1], 1)
    assert expand.expand is not None and not expand.use_res
    assert expand.se.fc1.out_channels == 24  # make_divisible(72 // 4, 8)
    assert isinstance(expand.dw.act, nn.Hardswish) and expand.dw.conv.groups == 72
    assert expand.dw.bn.eps == 1e-3 and expand.dw.bn.momentum == 0.01


def test_inverted_residual_adds_input() -> None:
    m = build_row("MobileNetV3_InvertedResidual", 8, [8, 16, 3, 1, 0, 0], 1).eval()
    x = torch.rand(1, 8, 8, 8)
    with torch.no_grad():
        body = m.project(m.dw(m.expand(x)))
        torch.testing.assert_close(m(x), x + body)


def test_shuffle_units_mix_channels() -> None:
    from models.shufflenetv2 import channel_shuffle
    x = torch.arange(4.0).view(1, 4, 1, 1)
    assert channel_shuffle(x, 2).flatten().tolist() == [0.0, 2.0, 1.0, 3.0]


def test_single_entry_from_lists() -> None:
    """`[-1]` behaves like `-1` for one-input blocks; Detect still gets a list with one level."""
    from models.yolo import Model
    cfg = {"nc": 1, "anchors": [[16, 16, 32, 32]], "backbone": [
        [-1, 1, "Conv", [8, 3, 2]], [[-1], 1, "Conv", [8, 3, 2]], [-1, 1, "Conv", [8, 3, 2]],
        [[-1], 1, "Detect", ["nc", "anchors"]]]}
    m = Model(cfg)
    assert m.layers[1].f == -1 and m.layers[3].f == [-1]
    assert m.stride.tolist() == [8.0] and m.detect.anchors.shape == (1, 2, 2)
    out = m(torch.rand(1, 3, 32, 32))
    assert len(out) == 1 and out[0].shape == (1, 2, 4, 4, 6)
