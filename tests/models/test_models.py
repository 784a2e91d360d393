"""Every YAML in models/ builds with the pinned parameter counts and strides; Model contract; fuse; CLI."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from models.head import Detect
from models.summary import gflops
from models.yolo import Model

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"

# Parameter counts at the YAML's own nc. yolov5n/s: YOLOv5's published numbers; MobileNetV3
# classifiers: torchvision's. The others are ours, pinned so unintended changes show up.
PARAMS = {
    "yolov5n": 1_872_157,
    "yolov5s": 7_235_389,
    "mobilenetv3-large-cls": 5_483_032,
    "mobilenetv3-small-cls": 2_542_856,
    "mobilenetv3-small-yolo": 534_117,
    "mobilenetv3-large-yolo": 3_020_149,
    "mobilenetv3-small-minimal-yolo": 294_765,
    "mobilenetv3-large-minimal-yolo": 1_461_405,
    "yolov5s-mobilenetv3-large": 5_754_413,
    "shufflenetv2-yolo": 263_277,
}
DETECTORS = [k for k in PARAMS if not k.endswith("-cls")]

_cache: dict[str, Model] = {}


def built(name: str) -> Model:
    """Each YAML is built once per test session (building is the expensive part)."""
    if name not in _cache:
        torch.manual_seed(0)
        _cache[name] = Model(MODELS / f"{name}.yaml")
    return _cache[name]


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_every_yaml_is_pinned() -> None:
    assert sorted(p.stem for p in MODELS.glob("*.yaml")) == sorted(PARAMS)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_yaml_builds_with_pinned_params(name: str) -> None:
    m = built(name)
    assert n_params(m) == PARAMS[name]
    if name in DETECTORS:
        assert m.stride.tolist() == [8.0, 16.0, 32.0]
        assert isinstance(m.detect, Detect) and m.detect.stride.tolist() == [8.0, 16.0, 32.0]
        assert m.detect.anchors.shape == (3, 3, 2) and m.detect.anchors[0, 0].tolist() == [10.0, 13.0]
        assert m.names == [str(i) for i in range(80)]
    else:
        assert m.detect is None and m.stride.tolist() == [32.0]


def test_every_row_comment_has_index_and_level() -> None:
    for path in MODELS.glob("*.yaml"):
        cfg = yaml.safe_load(path.read_text())
        rows = cfg["backbone"] + cfg["head"]
        # row lines start with "[" (anchor lines start with "- [")
        lines = [ln for ln in path.read_text().splitlines() if ln.lstrip().startswith("[")]
        assert len(lines) == len(rows), path.name
        for i, ln in enumerate(lines):
            comment = ln.split("#", 1)[1].split()
            assert comment[0] == str(i), f"{path.name}: row {i} comment {ln!r}"
            assert any(w.startswith(("P", "Detect(")) for w in comment[1:]), f"{path.name}: {ln!r}"


@pytest.mark.parametrize("name", ["mobilenetv3-small-minimal-yolo", "mobilenetv3-large-minimal-yolo"])
def test_minimal_models_are_minimalistic(name: str) -> None:
    """TF-slim `minimalistic=True`: ReLU only (no h-swish anywhere), no squeeze-excite, 3x3 depthwise convs."""
    m = built(name)
    kinds = {type(x).__name__ for x in m.modules()}
    assert "Hardswish" not in kinds and "SELayer" not in kinds and "ReLU" in kinds
    dw = [x for x in m.modules() if isinstance(x, nn.Conv2d) and x.groups > 1 and x.groups == x.in_channels]
    assert dw and all(x.kernel_size == (3, 3) for x in dw)
    full = built(name.replace("-minimal", ""))  # the same rows and taps as the h-swish/SE model
    assert len(m.layers) == len(full.layers)
    x = torch.zeros(1, 3, 64, 64)
    assert [t.shape for t in m.eval()(x)] == [t.shape for t in full.eval()(x)]


@pytest.mark.parametrize("name", ["mobilenetv3-small-yolo", "mobilenetv3-small-minimal-yolo", "yolov5n",
                                  "shufflenetv2-yolo"])
def test_detector_raw_maps_train_and_eval(name: str) -> None:
    m = built(name)
    x = torch.rand(2, 3, 64, 96)
    for mode in (True, False):
        m.train(mode)
        with torch.no_grad():
            out = m(x)
        assert [tuple(o.shape) for o in out] == [(2, 3, 8, 12, 85), (2, 3, 4, 6, 85), (2, 3, 2, 3, 85)]
    m.eval()


def test_classifier_logits() -> None:
    m = built("mobilenetv3-small-cls").eval()
    with torch.no_grad():
        assert m(torch.rand(2, 3, 64, 64)).shape == (2, 1000)


def test_small_yolo_budget() -> None:
    small = built("mobilenetv3-small-yolo")
    assert n_params(small) < n_params(built("yolov5n"))
    assert gflops(small, 320) <= 0.8
    assert n_params(built("shufflenetv2-yolo")) < 1_000_000
    assert min(PARAMS[d] for d in DETECTORS) == PARAMS["shufflenetv2-yolo"]


def test_detect_bias_priors() -> None:
    d = built("yolov5n").detect
    b = d.m[0].bias.view(d.na, d.no)
    p_obj = torch.sigmoid(b[:, 4])
    torch.testing.assert_close(p_obj, torch.full((3,), 8 / (640 / 8) ** 2), rtol=1e-4, atol=0)
    torch.testing.assert_close(torch.sigmoid(b[:, 5:]), torch.full((3, 80), 0.6 / 79.01), rtol=1e-4, atol=0)
    # coarser levels expect fewer cells per object, so a higher objectness prior
    assert d.m[2].bias.view(3, -1)[0, 4] > d.m[0].bias.view(3, -1)[0, 4]


def test_nc_override_dict_cfg_and_int_anchors() -> None:
    cfg = yaml.safe_load((MODELS / "mobilenetv3-small-yolo.yaml").read_text())
    cfg["anchors"] = 3
    m = Model(cfg, nc=2)
    assert m.yaml["nc"] == 2 and m.names == ["0", "1"] and m.detect.no == 7
    assert m.detect.anchors.tolist() == built("yolov5n").detect.anchors.tolist()
    assert cfg["nc"] == 80  # the caller's dict is not modified
    cfg["anchors"] = 2
    m2 = Model(cfg)
    assert m2.detect.anchors.shape == (3, 2, 2) and bool((m2.detect.anchors > 0).all())


def test_layers_metadata_and_save() -> None:
    m = built("yolov5n")
    assert [layer.i for layer in m.layers] == list(range(25))
    assert m.layers[12].f == [-1, 6] and m.layers[24].f == [17, 20, 23] and m.layers[24].type == "Detect"
    assert m.save == {4, 6, 10, 14, 17, 20, 23}
    assert sum(layer.np for layer in m.layers) == PARAMS["yolov5n"]


@pytest.mark.parametrize("name", ["mobilenetv3-small-yolo", "shufflenetv2-yolo", "yolov5n"])
def test_fuse_equal_outputs(name: str) -> None:
    torch.manual_seed(1)
    m = Model(MODELS / f"{name}.yaml")
    with torch.no_grad():  # non-trivial BN statistics: a few train-mode passes
        m.train()
        for _ in range(2):
            m(torch.rand(2, 3, 64, 64))
    m.eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref = m(x)
        assert m.fuse() is m
        out = m(x)
    assert not any(isinstance(s, nn.BatchNorm2d) for s in m.modules())
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_info_and_cli(capsys: pytest.CaptureFixture[str]) -> None:
    text = built("mobilenetv3-small-yolo").info(imgsz=64)
    assert "mobilenetv3-small-yolo summary: 26 layers, 534,117 parameters, 534,117 gradients" in text
    assert "GFLOPs at 64x64" in text and "MobileNetV3_InvertedResidual" in text
    from models.yolo import main
    from utils.core.errors import cli_main
    assert cli_main("yolo.py", main, ["--cfg", str(MODELS / "nope.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("yolo.py: error: model config not found") and "nope.yaml" in err


@pytest.mark.slow
def test_yolo_py_runs_as_a_script() -> None:
    """`python models/yolo.py --cfg ...` in a fresh interpreter (imports from the repo root, prints the table)."""
    proc = subprocess.run([sys.executable, "models/yolo.py", "--cfg", "models/shufflenetv2-yolo.yaml",
                           "--imgsz", "64"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 + 21 + 1 and lines[-1].startswith("shufflenetv2-yolo summary: 21 layers")


def test_width_075_classifiers_match_torchvision() -> None:
    import torchvision
    for v in ("small", "large"):
        cfg = yaml.safe_load((MODELS / f"mobilenetv3-{v}-cls.yaml").read_text())
        cfg["width_multiple"] = 0.75
        ours = n_params(Model(cfg))
        theirs = n_params(getattr(torchvision.models, f"mobilenet_v3_{v}")(width_mult=0.75))
        assert ours == theirs, v


def test_gflops_counts_every_conv() -> None:
    m = built("mobilenetv3-small-cls")
    # Scale check: a conv net's FLOPs grow with image area (the 1x1 SE/classifier part does not).
    g1, g2 = gflops(m, 64), gflops(m, 128)
    assert 3.0 < g2 / g1 < 4.0
    # One 1x1 conv 3->8 at 32x32: 2 * 3 * 8 * 32 * 32 FLOPs exactly.
    conv = nn.Conv2d(3, 8, 1, bias=False)
    assert gflops(conv, 32) * 1e9 == 2 * 3 * 8 * 32 * 32


def test_state_dict_round_trip_from_yaml_dict() -> None:
    m = built("mobilenetv3-small-yolo")
    sd = m.state_dict()
    assert not any(k.startswith("detect.") for k in sd)  # the head is stored once, under layers.25
    assert sd["layers.25.anchors"].shape == (3, 3, 2) and sd["layers.25.stride"].tolist() == [8, 16, 32]
    clone = Model(m.yaml)  # checkpoints rebuild from the stored yaml dict
    clone.load_state_dict(sd, strict=True)
    m.eval()
    clone.eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(m(x), clone(x)):
            assert torch.equal(a, b)
