"""hubconf.py: `torch.hub.load(repo, "custom", path=..., source="local")` works offline, for .pt and .onnx, and
gives detect.py's boxes on files, numpy arrays and PIL images."""
from __future__ import annotations

import sys

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import detect
from tests.backend_helpers import make_checkpoint, make_images
from utils.core.paths import ROOT
from utils.infer.backend import BackendError
from utils.infer.predictor import Predictor

NAMES = ["cell", "blob"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("w") / "best.pt", names=NAMES, obj_logit=3.0, seed=1)


def hub_load(path, **kwargs):
    return torch.hub.load(str(ROOT), "custom", path=str(path), source="local", **kwargs)


@pytest.mark.parametrize("fmt", ["pt", pytest.param("onnx", marks=pytest.mark.slow)])  # onnx: ~3 s to export
def test_hub_load_gives_detect_pys_boxes(fmt, weights, tmp_path):
    if fmt == "onnx":
        import export

        weights = export.run(weights, include=["onnx"], imgsz=64, outdir=tmp_path, threads=1, dynamic=True)["onnx"]
    files = make_images(tmp_path / "imgs", n=2, size=(80, 60), seed=3)
    before = list(sys.path)
    model = hub_load(weights, size=64, conf=0.3, max_det=5)
    assert isinstance(model, Predictor) and model.names == NAMES and model.backend.fmt == fmt
    assert sys.path == before, "torch.hub must leave sys.path as it was"
    det = detect.Detector(detect.DetectOptions(weights=weights, source=files[0].parent, imgsz=64, conf_thres=0.3,
                                               max_det=5, nosave=True, project=tmp_path / "runs"))
    want = [r.det for r in det.frames()]
    assert all(len(w) for w in want)
    for inputs in ([str(f) for f in files], files[0].parent, [cv2.imread(str(f)) for f in files],
                   [Image.open(f) for f in files]):
        got = model(inputs)
        assert got.n == 2
        for boxes, ref in zip(got.xyxy, want):
            np.testing.assert_allclose(boxes.numpy(), ref, rtol=1e-5, atol=1e-4)


def test_hubconf_lists_custom_and_reports_bad_weights(weights, tmp_path):
    sys.path.insert(0, str(ROOT))
    try:
        import hubconf
    finally:
        sys.path.remove(str(ROOT))
    assert [n for n in dir(hubconf) if callable(getattr(hubconf, n)) and not n.startswith("_")] == ["custom"]
    assert "torch" in hubconf.dependencies and "cv2" in hubconf.dependencies
    with pytest.raises(BackendError, match="missing.pt: weights file not found"):
        hub_load(tmp_path / "missing.pt")
    m = hub_load(weights, conf=0.5)
    assert m.conf == 0.5 and m.size is None  # no size: the checkpoint's own training size
    assert m(np.zeros((64, 64, 3), np.uint8)).shape == (1, 3, 64, 64)
