"""Bad model YAMLs: each raises one ModelConfigError naming the file, the row index and the row."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from models.registry import ModelConfigError
from models.yolo import Model

TINY = """\
nc: 2
depth_multiple: 1.0
width_multiple: 1.0
anchors:
  - [10,13, 16,30]  # P3/8
  - [30,61, 62,45]  # P4/16
backbone:
  [[-1, 1, conv_bn_hswish, [16, 2]],  # 0 P1/2
   [-1, 1, MobileNetV3_InvertedResidual, [16, 16, 3, 2, 1, 0]],  # 1 P2/4
   [-1, 1, MobileNetV3_InvertedResidual, [24, 72, 3, 2, 0, 0]],  # 2 P3/8
   [-1, 1, MobileNetV3_InvertedResidual, [40, 96, 5, 2, 1, 1]],  # 3 P4/16
  ]
head:
  [[-1, 1, Conv, [32, 1, 1]],  # 4 P4/16
   [-1, 1, nn.Upsample, [None, 2, 'nearest']],  # 5 P3/8
   [[-1, 2], 1, Concat, [1]],  # 6 P3/8
   [-1, 1, DWSConv, [32, 3, 1]],  # 7 P3/8
   [[7, 4], 1, Detect, [nc, anchors]],  # 8 Detect(P3/8, P4/16)
  ]
"""


def write(tmp_path: Path, text: str, name: str = "bad.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def mutated(tmp_path: Path, old: str, new: str) -> Path:
    assert old in TINY
    return write(tmp_path, TINY.replace(old, new, 1))


def expect_error(path: Path, row: int | None, *needles: str) -> str:
    with pytest.raises(ModelConfigError) as e:
        Model(path)
    msg = str(e.value)
    assert str(path) in msg
    if row is not None:
        assert f"row {row} " in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


def test_tiny_yaml_is_valid(tmp_path: Path) -> None:
    m = Model(write(tmp_path, TINY, "ok.yaml"))
    assert m.stride.tolist() == [8.0, 16.0] and m.detect.nl == 2


def test_unknown_module_lists_close_matches(tmp_path: Path) -> None:
    p = mutated(tmp_path, "MobileNetV3_InvertedResidual, [24", "MobileNetV3_InvertedResidul, [24")
    expect_error(p, 2, "unknown module 'MobileNetV3_InvertedResidul'", "did you mean",
                 "MobileNetV3_InvertedResidual", "[24, 72, 3, 2, 0, 0]")


def test_from_pointing_forward(tmp_path: Path) -> None:
    p = mutated(tmp_path, "[[-1, 2], 1, Concat", "[[-1, 7], 1, Concat")
    expect_error(p, 6, "points forward", "[-1, 7]")


def test_from_out_of_range(tmp_path: Path) -> None:
    p = mutated(tmp_path, "[[7, 4], 1, Detect", "[[7, -12], 1, Detect")
    expect_error(p, 8, "out of range", "-12")


def test_from_not_an_int(tmp_path: Path) -> None:
    p = mutated(tmp_path, "[[-1, 2], 1, Concat", "[[-1, two], 1, Concat")
    expect_error(p, 6, "`from` must be")


def test_wrong_argument_count(tmp_path: Path) -> None:
    p = mutated(tmp_path, "[24, 72, 3, 2, 0, 0]", "[24, 72, 3, 2, 0]")
    expect_error(p, 2, "takes 6 args, got 5")
    p = mutated(tmp_path, "conv_bn_hswish, [16, 2]", "conv_bn_hswish, [16]")
    expect_error(p, 0, "takes 2..3 args, got 1")


def test_channel_mismatch_detect_levels(tmp_path: Path) -> None:
    p = mutated(tmp_path, "[[7, 4], 1, Detect", "[[7, 4, 3], 1, Detect")
    expect_error(p, 8, "channel mismatch", "3 inputs", "2 levels")


def test_channel_mismatch_shuffle_unit(tmp_path: Path) -> None:
    p = mutated(tmp_path, "[-1, 1, DWSConv, [32, 3, 1]]", "[-1, 1, ShuffleV2Block, [64, 1]]")
    expect_error(p, 7, "channel mismatch", "in 56, out 64")


def test_spatial_mismatch_named_at_probe(tmp_path: Path) -> None:
    p = mutated(tmp_path, "[[-1, 2], 1, Concat", "[[-1, 3], 1, Concat")
    expect_error(p, 6, "Concat", "fails on inputs")


def test_bad_values(tmp_path: Path) -> None:
    expect_error(mutated(tmp_path, "[-1, 1, Conv, [32, 1, 1]]", "[-1, 0, Conv, [32, 1, 1]]"), 4,
                 "`number` must be a positive int")
    expect_error(mutated(tmp_path, "[-1, 1, Conv, [32, 1, 1]]", "[-1, 1, Conv, [-32, 1, 1]]"), 4,
                 "positive int")
    expect_error(mutated(tmp_path, "[[-1, 2], 1, Concat, [1]]", "[[-1, 2], 2, Concat, [1]]"), 6,
                 "cannot be repeated")
    expect_error(mutated(tmp_path, "[-1, 1, Conv, [32, 1, 1]]", "[-1, 1, Conv]"), 4,
                 "[from, number, module, args]")
    expect_error(mutated(tmp_path, "  - [30,61, 62,45]  # P4/16", "  - [30,61, 62]  # P4/16"), 8,
                 "even-length")
    expect_error(mutated(tmp_path, "[16, 2]],  # 0", "[16, 2, 3, 4]],  # 0"), 0, "takes 2..3 args")
    expect_error(mutated(tmp_path, "[24, 72, 3, 2, 0, 0]", "[24, 72, 3, 3, 0, 0]"), 2, "stride must be 1 or 2")


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        Model(tmp_path / "missing.yaml")
    expect_error(write(tmp_path, "- just\n- a list\n"), None, "mapping")
    expect_error(write(tmp_path, "nc: [1\nbackbone: {"), None, "not valid YAML")
    expect_error(write(tmp_path, "nc: 2\n"), None, "no rows")


def test_dict_cfg_names_yaml_file() -> None:
    cfg = yaml.safe_load(TINY)
    cfg["yaml_file"] = "from_a_dict.yaml"
    cfg["backbone"][1][2] = "NoSuchBlock"
    with pytest.raises(ModelConfigError, match=r"from_a_dict\.yaml: row 1 \(backbone\)"):
        Model(cfg)
    assert issubclass(ModelConfigError, ValueError)
