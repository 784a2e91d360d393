"""export.py: ONNX and TorchScript parity with PyTorch for every detector YAML, graph contents, failures."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import export
from tests.backend_helpers import make_checkpoint
from utils.infer.backend import DetectBackend
from utils.export.exporters import onnx_op_types

MODELS = Path(__file__).resolve().parents[2] / "models"
DETECTOR_YAMLS = sorted(p.name for p in MODELS.glob("*.yaml")
                        if (yaml.safe_load(p.read_text()) or {}).get("head", [[None] * 3])[-1][2] == "Detect")


# the headline model's export runs in the quick tier; every other YAML's (1-4 s each) only in the full suite
EXPORT_CASES = [pytest.param(c, marks=() if c == "mobilenetv3-small-yolo.yaml" else pytest.mark.slow)
                for c in DETECTOR_YAMLS]


def test_detector_yamls_found():
    assert len(DETECTOR_YAMLS) >= 5, DETECTOR_YAMLS  # yolov5n/s, MobileNetV3 large/small, ShuffleNetV2


@pytest.mark.parametrize("cfg", EXPORT_CASES)
def test_onnx_and_torchscript_parity_at_320(tmp_path, cfg, capsys):
    pt = make_checkpoint(tmp_path / "best.pt", MODELS / cfg, nc=2, imgsz=320, names=["rbc", "wbc"])
    files = export.run(pt, include=("onnx", "torchscript"), imgsz=320, threads=1)  # raises ExportError on mismatch
    printed = capsys.readouterr().out
    assert "onnx vs PyTorch: max abs diff" in printed and "torchscript vs PyTorch: max abs diff" in printed
    # independent re-check on a different input: random noise instead of the BCCD image
    x = torch.rand(1, 3, 320, 320)
    ref = DetectBackend(pt)(x)
    for fmt, file in files.items():
        b = DetectBackend(file, threads=1)
        assert (b.names, b.imgsz, b.stride) == (["rbc", "wbc"], (320, 320), 32), fmt
        p = export.compare(fmt, ref, b(x))
        assert p.ok, str(p)
    ops = onnx_op_types(files["onnx"])
    assert "BatchNormalization" not in ops, "BN must be fused before export"
    from models.mobilenetv3 import SELayer, h_sigmoid, h_swish
    from models.checkpoint import model_from_checkpoint

    modules = list(model_from_checkpoint(pt).modules())
    if any(isinstance(m, (nn.Hardswish, h_swish)) for m in modules):
        assert ops.get("HardSwish", 0) > 0, f"h-swish was decomposed: {ops}"
    if any(isinstance(m, (SELayer, h_sigmoid)) for m in modules):
        assert ops.get("HardSigmoid", 0) > 0, f"h-sigmoid was decomposed: {ops}"
    # relu6-style decompositions would show up as Clip (Div alone also appears in shape arithmetic)
    assert "Clip" not in ops, f"an activation was decomposed into Clip: {ops}"


def test_dynamic_onnx_runs_other_sizes_and_batches(tmp_path):
    pt = make_checkpoint(tmp_path / "m.pt", imgsz=64)
    f = export.run(pt, include=["onnx"], imgsz=64, dynamic=True)["onnx"]
    b = DetectBackend(f)
    assert b.dynamic and b.batch is None
    x = torch.rand(3, 3, 48, 96)
    assert export.compare("onnx", DetectBackend(pt)(x), b(x)).ok


def test_batch_size_and_rectangular_imgsz(tmp_path):
    pt = make_checkpoint(tmp_path / "m.pt", imgsz=64)
    f = export.run(pt, include=["onnx"], imgsz=[48, 80], batch_size=2, outdir=tmp_path / "out")["onnx"]
    assert f == tmp_path / "out" / "m.onnx"
    b = DetectBackend(f)
    assert (b.imgsz, b.batch, b.dynamic) == ((48, 80), 2, False)
    assert b(torch.rand(2, 3, 48, 80)).shape == (2, 3 * (6 * 10 + 3 * 5), 7)


def test_parity_failure_raises(tmp_path, monkeypatch):
    pt = make_checkpoint(tmp_path / "m.pt", imgsz=64)
    real_call = DetectBackend.__call__

    def off_by_a_bit(self, x):
        out = real_call(self, x)
        out[..., 5] += 2e-4 if self.fmt == "onnx" else 0.0  # a class probability off by 2e-4
        return out

    monkeypatch.setattr(DetectBackend, "__call__", off_by_a_bit)
    with pytest.raises(export.ExportError, match="does not match PyTorch"):
        export.run(pt, include=["onnx"], imgsz=64)


def test_compare_tolerance_rules():
    ref = torch.zeros(1, 2, 7)
    ref[..., :4] = 300.0
    out = ref.clone()
    out[..., 0] += 0.01  # 0.01 px at 300 px: 3.3e-5 relative -> ok
    assert export.compare("x", ref, out).ok
    out[..., 1] += 0.05  # 1.7e-4 relative -> fail
    assert not export.compare("x", ref, out).ok
    out = ref.clone()
    out[..., 4] += 1.5e-4  # objectness off by more than 1e-4 -> fail
    p = export.compare("x", ref, out)
    assert not p.ok and p.max_abs_scores == pytest.approx(1.5e-4, rel=1e-3)
    with pytest.raises(export.ExportError, match="output shape"):
        export.compare("x", ref, ref[:, :1])


def test_bad_arguments(tmp_path, caplog, capsys):
    pt = make_checkpoint(tmp_path / "m.pt", imgsz=64)
    with pytest.raises(export.ExportError, match="--include paddle"):
        export.run(pt, include=["paddle"])
    with pytest.raises(export.ExportError, match="multiples of the model stride 16"):
        export.run(pt, include=["onnx"], imgsz=70)
    with pytest.raises(export.ExportError, match="checkpoint file not found"):
        export.run(tmp_path / "nope.pt", include=["onnx"])
    (tmp_path / "junk.pt").write_bytes(b"junk" * 20)
    with pytest.raises(export.ExportError, match="not a valid MobileYOLO checkpoint"):
        export.run(tmp_path / "junk.pt", include=["onnx"])
    from utils.core.errors import cli_main

    assert cli_main("export.py", export.main, ["--weights", str(tmp_path / "nope.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("export.py: error: ") and "nope.pt: checkpoint file not found" in err[0]


def test_simplify_without_onnxsim_warns_and_still_exports(tmp_path, caplog):
    pt = make_checkpoint(tmp_path / "m.pt", imgsz=64)
    try:
        import onnxsim  # noqa: F401
        have = True
    except ImportError:
        have = False
    with caplog.at_level(logging.WARNING):
        f = export.run(pt, include=["onnx"], imgsz=64, simplify=True)["onnx"]
    assert f.is_file()
    assert have or "onnxsim is not installed" in caplog.text


def test_cli(tmp_path, capsys):
    pt = make_checkpoint(tmp_path / "m.pt", imgsz=64)
    assert export.main(["--weights", str(pt), "--include", "torchscript", "--imgsz", "64"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "m.torchscript").is_file() and "max abs diff" in out and "Export done" in out


def _quick_trained_checkpoint(root: Path) -> tuple[Path, Path]:
    """(data YAML, checkpoint) of the tiny model fitted for 150 Adam steps on 8 synthetic images.

    Gives mAP50 around 0.7 (measured 0.77 with 200 steps), so equal mAPs across formats mean something.
    """
    from models.yolo import Model
    from tests.backend_helpers import TINY
    from models.checkpoint import save_checkpoint
    from utils.data import check_dataset, create_dataloader
    from utils.data.data_yaml import load_hyp
    from utils.data.synthetic import make_synthetic_dataset
    from utils.train.loss import ComputeLoss

    data = make_synthetic_dataset(root / "syn", n_train=8, n_val=4, imgsz=64, nc=2, seed=1, same_val=True,
                                  max_objects=2)
    torch.manual_seed(0)
    model, hyp = Model(TINY, nc=2), load_hyp()
    loader, _ = create_dataloader(check_dataset(data).train, 64, 8, stride=16, hyp=hyp, workers=0, shuffle=True)
    loss_fn = ComputeLoss(model.detect.anchors, model.detect.stride, 2, hyp)
    opt = torch.optim.Adam(model.parameters(), lr=0.005)
    model.train()
    for _ in range(150):
        imgs, targets, _, _ = next(iter(loader))
        loss, _ = loss_fn(model(imgs.float() / 255), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    ckpt = root / "best.pt"
    save_checkpoint({"model": model.state_dict(), "ema": None, "yaml": model.yaml, "names": ["red", "green"],
                     "anchors": model.detect.anchors, "stride": model.stride, "hyp": {}, "args": {"imgsz": 64},
                     "epoch": 0, "optimizer": None, "best_fitness": 0.0}, ckpt)
    return data, ckpt


@pytest.mark.slow
def test_val_gives_the_same_map_on_exports(tmp_path, capsys):
    import val

    data, pt = _quick_trained_checkpoint(tmp_path)
    dyn = export.run(pt, include=["onnx", "torchscript"], imgsz=64, dynamic=True, threads=1)
    static = export.run(pt, include=["onnx"], imgsz=64, outdir=tmp_path / "static", threads=1)["onnx"]
    maps = {}
    for name, w in (("pt", pt), ("onnx", dyn["onnx"]), ("torchscript", dyn["torchscript"]), ("onnx-static", static)):
        m = val.run(data, w, imgsz=64, batch_size=8, workers=0, project=tmp_path / "runs", plots=False)
        maps[name] = (m.map50, m.map)
    m = val.run(data, pt, imgsz=64, batch_size=8, workers=0, project=tmp_path / "runs", plots=False, rect=False)
    maps["pt-square"] = (m.map50, m.map)
    capsys.readouterr()
    assert maps["pt"][0] > 0.3, f"the quick model should detect something: {maps}"
    for name in ("onnx", "torchscript"):  # same (rectangular) batches as .pt: mAP must agree
        assert abs(maps[name][0] - maps["pt"][0]) <= 1e-3 and abs(maps[name][1] - maps["pt"][1]) <= 1e-3, maps
    # a fixed-size export sees square letterboxed images: compare with .pt on the same (square) batches
    assert all(abs(a - b) <= 1e-3 for a, b in zip(maps["onnx-static"], maps["pt-square"])), maps
    print(f"val mAP50/mAP per format: {maps}")
