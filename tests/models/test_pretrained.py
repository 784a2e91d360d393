"""torchvision MobileNetV3 weights -> our YAML models: classifier parity and detector backbone taps.

Uses torchvision's own randomly initialised models saved to a local file (no download ever).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from models.pretrained import LoadReport, load_torchvision_backbone
from models.yolo import Model

MODELS = Path(__file__).resolve().parents[2] / "models"
TAPS = {"small": [3, 8, 11], "large": [6, 12, 15]}  # our rows == torchvision features indices
# the torchvision backbone each detector YAML equals: Small uses the paper's reduced tail for detection
DETECTOR_TV = {"small": {"reduced_tail": True}, "large": {}}


@pytest.fixture(autouse=True)
def no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    """The online path must never run in tests."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("tests must not download weights")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


def torchvision_model(variant: str, **kwargs: bool) -> nn.Module:
    torch.manual_seed(0)
    m = getattr(torchvision.models, f"mobilenet_v3_{variant}")(**kwargs)
    g = torch.Generator().manual_seed(1)
    for mod in m.modules():  # non-trivial BN statistics, so a wrong mapping cannot hide
        if isinstance(mod, nn.BatchNorm2d):
            n = mod.num_features
            mod.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return m.eval()


@pytest.fixture(scope="module", params=["small", "large"])
def tv_file(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
            ) -> tuple[str, nn.Module, Path]:
    variant = request.param
    tv = torchvision_model(variant)
    path = tmp_path_factory.mktemp("tv") / f"mobilenet_v3_{variant}.pth"
    torch.save(tv.state_dict(), path)
    return variant, tv, path


def test_classifier_matches_torchvision(tv_file: tuple[str, nn.Module, Path]) -> None:
    variant, tv, path = tv_file
    m = Model(MODELS / f"mobilenetv3-{variant}-cls.yaml")
    report = load_torchvision_backbone(m, path)
    assert isinstance(report, LoadReport)
    assert report.skipped == [] and report.reasons == []
    assert len(report.loaded) == len(tv.state_dict())
    m.eval()
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        ref = tv(x)
        out = m(x)
        assert (out - ref).abs().max().item() < 1e-5
        m.fuse()
        assert (m(x) - ref).abs().max().item() < 1e-5
    assert ref.abs().max().item() > 1e-3  # the comparison is not between two near-zero outputs


def _features(tv: nn.Module, x: torch.Tensor) -> dict[int, torch.Tensor]:
    feats, y = {}, x
    for i, block in enumerate(tv.features):
        y = block(y)
        feats[i] = y
    return feats


@pytest.mark.parametrize("variant", ["small", "large"])
def test_detector_taps_equal_features(variant: str, tmp_path: Path) -> None:
    tv = torchvision_model(variant, **DETECTOR_TV[variant])
    path = tmp_path / f"mobilenet_v3_{variant}.pth"
    torch.save(tv.state_dict(), path)
    m = Model(MODELS / f"mobilenetv3-{variant}-yolo.yaml")
    before = m.layers[-1].m[0].weight.clone()
    report = load_torchvision_backbone(m, path)
    n_feats = len(tv.features)
    assert [r for r, _ in report.rows] == list(range(n_feats - 1))  # all but the dropped last conv
    assert all(k.startswith((f"features.{n_feats - 1}.", "classifier.")) for k in report.skipped)
    assert torch.equal(m.layers[-1].m[0].weight, before)  # the head is untouched
    m.eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        taps = m.tap(x, TAPS[variant])
        feats = _features(tv, x)
    for t, i in zip(taps, TAPS[variant]):
        assert t.shape == feats[i].shape
        assert (t - feats[i]).abs().max().item() < 1e-5


def test_small_detector_takes_imagenet_rows_before_the_reduced_tail(tmp_path: Path) -> None:
    """torchvision's ImageNet weights are for the full tail: rows 0-8 load, row 9 stops the match."""
    tv = torchvision_model("small")
    path = tmp_path / "mobilenet_v3_small.pth"
    torch.save(tv.state_dict(), path)
    m = Model(MODELS / "mobilenetv3-small-yolo.yaml")
    tail = {k: v.clone() for k, v in m.state_dict().items() if k.startswith(("layers.9.", "layers.10.", "layers.11."))}
    report = load_torchvision_backbone(m, path)
    assert [r for r, _ in report.rows] == list(range(9))
    assert len(report.reasons) == 1 and report.reasons[0].startswith("row 9 ")
    assert all(torch.equal(m.state_dict()[k], v) for k, v in tail.items())  # the tail keeps its init
    assert any(k.startswith("features.9.") for k in report.skipped)
    m.eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        taps, feats = m.tap(x, [3, 8]), _features(tv, x)
    for t, i in zip(taps, [3, 8]):
        assert (t - feats[i]).abs().max().item() < 1e-5


def test_seed_yaml_takes_large_weights() -> None:
    m = Model(MODELS / "yolov5s-mobilenetv3-large.yaml")
    report = load_torchvision_backbone(m, torchvision_model("large").state_dict())
    assert len(report.rows) == 16  # same shapes; only the stride placement differs from torchvision
    assert not report.reasons


def test_mismatch_stops_and_reports(tv_file: tuple[str, nn.Module, Path]) -> None:
    variant, _, path = tv_file
    other = "large" if variant == "small" else "small"
    m = Model(MODELS / f"mobilenetv3-{other}-yolo.yaml")
    report = load_torchvision_backbone(m, path)
    assert report.reasons and "does not match" in report.reasons[0]
    assert len(report.rows) < 3
    assert "loaded" in str(report)


def test_bad_inputs(tmp_path: Path) -> None:
    m = Model(MODELS / "mobilenetv3-small-yolo.yaml")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_torchvision_backbone(m, tmp_path / "missing.pth")
    p = tmp_path / "not_mnv3.pth"
    torch.save({"conv.weight": torch.zeros(1)}, p)
    with pytest.raises(ValueError, match="not a torchvision MobileNetV3 state_dict"):
        load_torchvision_backbone(m, p)
    sd = torchvision_model("small").state_dict()
    report = load_torchvision_backbone(Model(MODELS / "yolov5n.yaml"), sd)
    assert report.loaded == [] and len(report.skipped) == len(sd)
    fused = Model(MODELS / "mobilenetv3-small-yolo.yaml").fuse()
    report = load_torchvision_backbone(fused, sd)
    assert report.loaded == [] and "fused" in report.reasons[0]


def test_weights_enum_like_object_is_used_offline() -> None:
    """An object with get_state_dict (torchvision's WeightsEnum interface) is asked for its dict."""
    sd = torchvision_model("small").state_dict()

    class FakeWeights:
        calls = 0

        def get_state_dict(self, progress: bool = True) -> dict[str, torch.Tensor]:
            FakeWeights.calls += 1
            return sd

    report = load_torchvision_backbone(Model(MODELS / "mobilenetv3-small-cls.yaml"), FakeWeights())
    assert FakeWeights.calls == 1 and report.skipped == []
