"""Registry: decorator refuses duplicates, lookups suggest close names, every block declares its rules."""
from __future__ import annotations

import pytest
from torch import nn
from torchvision.models._utils import _make_divisible

import models.parse  # noqa: F401  (fills the registry)
from models.registry import REGISTRY, Block, ceil8, close_matches, lookup, make_divisible, register


def test_duplicate_name_refused() -> None:
    @register("_TestOnlyBlockA")
    class A(Block):
        pass

    try:
        with pytest.raises(ValueError, match="already registered"):
            @register("_TestOnlyBlockB", "_TestOnlyBlockA")
            class B(Block):
                pass
        # a refused registration must not leave partial entries behind
        assert "_TestOnlyBlockB" not in REGISTRY
        assert REGISTRY["_TestOnlyBlockA"] is A
        with pytest.raises(ValueError, match="already registered"):
            register("Conv")(type("Conv", (Block,), {}))
    finally:
        REGISTRY.pop("_TestOnlyBlockA", None)
        REGISTRY.pop("_TestOnlyBlockB", None)


def test_register_needs_a_name() -> None:
    with pytest.raises(ValueError):
        register()


def test_unknown_name_lists_close_matches() -> None:
    with pytest.raises(KeyError) as e:
        lookup("MobileNetV3_InvertedResidul")
    assert "MobileNetV3_InvertedResidual" in str(e.value)
    assert close_matches("conv_bn_hswsh")[0] == "conv_bn_hswish"
    with pytest.raises(KeyError, match="unknown module 'Zzzzqqq'"):
        lookup("Zzzzqqq")


@pytest.mark.parametrize("a, b", [
    ("nn.Upsample", "Upsample"), ("conv_bn_hswish", "ConvBNHSwish"),
    ("MobileNetV3_InvertedResidual", "MBConv3"), ("ShuffleV2Block", "ShuffleNetV2_InvertedResidual"),
    ("h_swish", "HSwish"), ("h_sigmoid", "HSigmoid"), ("SELayer", "SqueezeExcite")])
def test_aliases_share_a_class(a: str, b: str) -> None:
    assert lookup(a) is lookup(b)


def test_seed_and_yolov5_names_present() -> None:
    for name in ["Conv", "DWConv", "Bottleneck", "C3", "SPPF", "Concat", "nn.Upsample", "Detect",
                 "h_sigmoid", "h_swish", "SELayer", "conv_bn_hswish", "MobileNetV3_InvertedResidual",
                 "StemBlock", "ShuffleV2Block", "Classify"]:
        assert name in REGISTRY


def test_every_block_declares_its_rules() -> None:
    for name, cls in REGISTRY.items():
        assert issubclass(cls, nn.Module), name
        assert cls.depth_rule in ("repeat", "arg", "none"), name
        lo, hi = cls.yaml_args
        assert 0 <= lo <= hi, name
        assert "channels" in vars(cls) or any("channels" in vars(b) for b in cls.__mro__[1:]
                                               if b is not Block), name


def test_rounding_rules() -> None:
    for v in [1, 7.5, 12, 16 * 0.75, 24 * 0.35, 72 * 0.75, 88 * 1.25, 240 * 0.5, 1000.4]:
        assert make_divisible(v, 8) == _make_divisible(v, 8), v
    assert make_divisible(20, 8) == 24 and make_divisible(36, 8) == 40
    assert ceil8(64 * 0.25) == 16 and ceil8(1024 * 0.25) == 256 and ceil8(20) == 24
