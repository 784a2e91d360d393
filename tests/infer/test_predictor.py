"""utils.infer.predictor / results: the Python API gives detect.py's boxes for files, arrays, PIL images and
tensors (.pt and .onnx), every output form agrees with the others, and bad input gets one-line errors."""
from __future__ import annotations

import json
import sys

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import detect
from tests.backend_helpers import make_checkpoint, make_images, make_video
from utils.core.errors import UserError
from utils.infer.predictor import PredictError, Predictor
from utils.infer.results import Detections, ResultsError
from utils.infer.sources import SourceError

NAMES = ["cell", "blob"]
COMMON = {"imgsz": 64, "conf_thres": 0.25, "max_det": 4}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny checkpoint whose objectness bias is high, so every image gets detections."""
    return make_checkpoint(tmp_path_factory.mktemp("w") / "best.pt", names=NAMES, obj_logit=3.0)


@pytest.fixture(scope="module")
def onnx_weights(weights, tmp_path_factory):
    import export

    return export.run(weights, include=["onnx"], imgsz=64, outdir=tmp_path_factory.mktemp("onnx"), threads=1)["onnx"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("imgs") / "imgs", n=3, size=(80, 60))


def detect_boxes(weights, source, tmp_path) -> list[np.ndarray]:
    """detect.py's detections for `source`, one [n, 6] array per image."""
    det = detect.Detector(detect.DetectOptions(weights=weights, source=source, nosave=True,
                                               project=tmp_path / "runs", **COMMON))
    return [r.det for r in det.frames()]


def assert_same(results: Detections, want: list[np.ndarray]) -> None:
    assert results.n == len(want)
    for got, ref in zip(results.xyxy, want):
        assert got.shape == ref.shape and len(ref) > 0
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-4)


def one_line(e: pytest.ExceptionInfo) -> str:
    assert isinstance(e.value, UserError)
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


@pytest.mark.parametrize("fmt", ["pt", "onnx"])
def test_files_folder_arrays_pil_and_tensors_give_detect_pys_boxes(fmt, weights, onnx_weights, images, tmp_path):
    w = weights if fmt == "pt" else onnx_weights
    want = detect_boxes(w, images[0].parent, tmp_path)
    model = Predictor(w, size=64, max_det=4)
    arrays = [cv2.imread(str(f)) for f in images]
    batch = torch.stack([torch.from_numpy(a[..., ::-1].copy()).permute(2, 0, 1) for a in arrays]).float() / 255
    for inputs in (images[0].parent, [str(f) for f in images], arrays, [Image.open(f) for f in images],
                   batch, list(batch)):
        assert_same(model(inputs), want)
    one = model(images[1])  # a single image, not in a list
    assert_same(one, want[1:2])
    assert one.files == [str(images[1])] and model(arrays[0]).files == ["image0.jpg"]
    assert model([Image.open(images[2])]).files == [str(images[2])]  # a PIL image keeps its filename


def test_output_forms_agree(weights, images, tmp_path, capsys):
    r = Predictor(weights, size=64, max_det=4)([cv2.imread(str(f)) for f in images] + [str(images[0])])
    assert r.n == len(r) == 4 and r.names == NAMES and r.shape == (4, 3, 48, 64)
    for xyxy, xywh, xyxyn, xywhn, im in zip(r.xyxy, r.xywh, r.xyxyn, r.xywhn, r.ims):
        h, w = im.shape[:2]
        gain = torch.tensor([w, h, w, h, 1, 1])
        assert xyxy.shape[1] == 6 and torch.equal(xyxy[:, 4:], xywh[:, 4:])
        torch.testing.assert_close(xywh[:, :2], (xyxy[:, :2] + xyxy[:, 2:4]) / 2)
        torch.testing.assert_close(xywh[:, 2:4], xyxy[:, 2:4] - xyxy[:, :2])
        torch.testing.assert_close(xyxyn * gain, xyxy)
        torch.testing.assert_close(xywhn * gain, xywh)
        assert 0 <= xyxyn[:, :4].min() and xyxyn[:, :4].max() <= 1
    plain = r.tolist()
    assert json.loads(r.to_json()) == plain and plain[3]["file"] == str(images[0])
    for rec, boxes in zip(plain, r.xyxy):
        assert (rec["height"], rec["width"]) == (60, 80) and len(rec["detections"]) == len(boxes)
        for d, row in zip(rec["detections"], boxes.tolist()):
            assert [d["xmin"], d["ymin"], d["xmax"], d["ymax"], d["confidence"], d["class"]] == pytest.approx(row)
            assert d["name"] == NAMES[d["class"]]
    n = r.tolist("xywhn")[0]["detections"][0]
    assert [n["xcenter"], n["ycenter"], n["width"], n["height"]] == pytest.approx(r.xywhn[0][0, :4].tolist())
    r.print()
    out = capsys.readouterr().out.splitlines()
    counts = {c: int((r.xyxy[0][:, 5] == c).sum()) for c in range(2)}
    first = ", ".join(f"{k} {NAMES[c]}{'s' * (k > 1)}" for c, k in counts.items() if k)
    assert out[0] == f"image 1/4: 60x80 {first}" and len(out) == 5
    assert out[-1].startswith("Speed: ") and "ms pre-process" in out[-1] and "ms NMS per image at shape (4, 3, 48, 64)" in out[-1]
    assert set(r.speed) == {"pre", "inf", "nms"} and all(v >= 0 for v in r.t) and str(r) == "\n".join(out)


def test_render_save_and_crop_write_what_detect_py_writes(weights, images, tmp_path):
    model = Predictor(weights, size=64, max_det=4)
    r = model([cv2.imread(str(f)) for f in images] + [images[0]])  # image0.jpg .. image2.jpg, img0.png
    before = [im.copy() for im in r.ims]
    drawn = r.render()
    assert [d.shape for d in drawn] == [im.shape for im in before] and all((d != b).any() for d, b in zip(drawn, before))
    assert all(np.array_equal(a, b) for a, b in zip(r.ims, before)), "render must not draw on the originals"
    out = r.save(tmp_path / "pred", save_txt=True, save_conf=True)
    assert out == tmp_path / "pred" and r.save(tmp_path / "pred").name == "pred2"
    names = ["image0.jpg", "image1.jpg", "image2.jpg", "img0.png"]
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == names
    assert np.array_equal(cv2.imread(str(out / "img0.png")), drawn[3])  # png: lossless, the rendered image
    # the labels are detect.py's, file for file and byte for byte
    run = detect.run(weights=weights, source=images[0], project=tmp_path / "d", save_txt=True, save_conf=True,
                     nosave=True, **COMMON)
    assert (out / "labels" / "img0.txt").read_text() == (run.save_dir / "labels" / "img0.txt").read_text()
    rows = np.loadtxt(out / "labels" / "image1.txt", ndmin=2)
    np.testing.assert_allclose(rows[:, 1:5], r.xywhn[1][:, :4].numpy(), atol=1e-6)
    np.testing.assert_allclose(rows[:, [5, 0]], r.xywhn[1][:, 4:].numpy(), atol=1e-6)
    crops = r.crop(tmp_path / "crops")
    assert len(crops) == sum(len(p) for p in r.xyxy) > 0
    for c in crops:
        x1, y1, x2, y2 = c["box"]
        assert c["im"].shape[:2] == (int(np.ceil(y2)) - int(y1), int(np.ceil(x2)) - int(x1))
        assert c["label"].startswith(NAMES[c["cls"]] + " ")
    files = sorted((tmp_path / "crops" / "crops").rglob("*.jpg"))
    assert len(files) == len(crops) and {f.parent.name for f in files} <= set(NAMES)
    assert all(cv2.imread(str(f)) is not None for f in files)


def test_settings_as_keywords_and_attributes(weights, images):
    model = Predictor(weights, size=64)
    base = model(images[0])
    assert len(base.xyxy[0]) > 1
    assert len(model(images[0], max_det=1).xyxy[0]) == 1
    high = float(base.xyxy[0][:, 4].max()) - 1e-4
    assert 0 < len(model(images[0], conf=high).xyxy[0]) < len(base.xyxy[0])
    model.conf = 0.99  # an attribute, as in YOLOv5's model.conf
    assert len(model(images[0]).xyxy[0]) == 0 and "(no detections)" in str(model(images[0]))
    model.conf = 0.25
    only = model(images[0], classes=[1]).xyxy[0]
    assert len(only) and (only[:, 5] == 1).all()
    assert model(images[0], size=96).shape == (1, 3, 80, 96)  # 80x60 -> 96x72, rounded up to the stride (16)


def test_a_batch_of_different_sizes_pads_to_a_common_shape(weights, onnx_weights, tmp_path):
    wide = make_images(tmp_path / "a", n=1, size=(80, 60))[0]
    tall = make_images(tmp_path / "b", n=1, size=(60, 80), seed=1)[0]
    square = make_images(tmp_path / "c", n=1, size=(64, 64), seed=2)[0]
    model = Predictor(weights, size=64, max_det=4)
    r = model([wide, tall, square])
    assert r.shape == (3, 3, 64, 64) and [im.shape[:2] for im in r.ims] == [(60, 80), (80, 60), (64, 64)]
    for boxes, im in zip(r.xyxy, r.ims):
        assert len(boxes) and boxes[:, [0, 2]].max() <= im.shape[1] and boxes[:, [1, 3]].max() <= im.shape[0]
    # the square image fills the common shape, so it sees exactly the input it sees alone
    torch.testing.assert_close(r.xyxy[2], model(square).xyxy[0], rtol=1e-5, atol=1e-4)
    # the others are centred on 64x64: the input a fixed 64x64 export letterboxes each of them to alone
    fixed = Predictor(onnx_weights, max_det=4)
    for k, f in enumerate((wide, tall)):
        torch.testing.assert_close(r.xyxy[k], fixed(f).xyxy[0], rtol=1e-4, atol=1e-3)


def test_bad_inputs_and_settings_give_one_line_errors(weights, tmp_path):
    model = Predictor(weights, size=64)
    img = np.zeros((60, 80, 3), np.uint8)
    cases = [
        (lambda: model(42), PredictError, "unsupported type int"),
        (lambda: model([img, {"a": 1}]), PredictError, "input 1: unsupported type dict"),
        (lambda: model([]), PredictError, "no images given"),
        (lambda: model(tmp_path / "missing.jpg"), SourceError, "missing.jpg: source not found"),
        (lambda: model("https://example.com/a.jpg"), PredictError, "nothing is downloaded"),
        (lambda: model(torch.rand(64, 64)), PredictError, "got shape (64, 64)"),
        (lambda: model(torch.rand(1, 1, 3, 64, 64)), PredictError, "[B, 3, h, w]"),
        (lambda: model(torch.zeros(3, 64, 64, dtype=torch.uint8)), PredictError, "float RGB in 0..1, got torch.uint8"),
        (lambda: model(torch.full((3, 64, 64), 255.0)), PredictError, "values must lie in 0..1"),
        (lambda: model(img.astype(np.float32)), PredictError, "must be uint8"),
        (lambda: model(np.zeros((60, 80, 5), np.uint8)), PredictError, "got shape (60, 80, 5)"),
        (lambda: model(img, conf=1.5), PredictError, "conf=1.5: must be a number in 0..1"),
        (lambda: model(img, iou="high"), PredictError, "iou='high'"),
        (lambda: model(img, max_det=0), PredictError, "max_det=0"),
        (lambda: model(img, classes=[5]), PredictError, "classes=[5]: the model has classes 0..1 (cell, blob)"),
        (lambda: model(img, size=-3), PredictError, "size -3"),
        (lambda: Predictor(weights, conf=-0.1), PredictError, "conf=-0.1"),
        (lambda: Predictor(tmp_path / "none.pt"), UserError, "none.pt: weights file not found"),
    ]
    for call, kind, text in cases:
        with pytest.raises(kind) as e:
            call()
        assert text in one_line(e), (text, str(e.value))
    video = make_video(tmp_path / "clip.mp4", n=2, size=(64, 64))
    with pytest.raises(PredictError, match="clip.mp4: videos are not read here") as e:
        model(video)
    one_line(e)
    (tmp_path / "bad" / "broken.jpg").parent.mkdir()
    (tmp_path / "bad" / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(SourceError) as e:
        model(tmp_path / "bad" / "broken.jpg")
    assert "broken.jpg" in one_line(e)
    (tmp_path / "bad" / "broken2.png").write_bytes(b"not an image either")
    with pytest.raises(PredictError, match="no readable image") as e:
        model(tmp_path / "bad")  # a folder: each unreadable image is skipped with a warning, then nothing is left
    one_line(e)
    with pytest.raises(PredictError, match="no readable image"):
        model(torch.zeros(0, 3, 64, 64))


def test_pandas_is_optional(weights, images, monkeypatch):
    r = Predictor(weights, size=64, max_det=4)(images[0])
    with pytest.raises(ResultsError, match="unknown|expected one of") as e:
        r.tolist("xyxyz")
    one_line(e)
    monkeypatch.setitem(sys.modules, "pandas", None)  # as if pandas were not installed
    with pytest.raises(ResultsError, match="needs pandas, which is not installed") as e:
        r.pandas()
    one_line(e)


def test_pandas_dataframes_when_installed(weights, images):
    pd = pytest.importorskip("pandas")
    r = Predictor(weights, size=64, max_det=4)(images[:2])
    frames = r.pandas()
    assert len(frames) == 2 and all(isinstance(f, pd.DataFrame) for f in frames)
    assert list(frames[0].columns) == ["xmin", "ymin", "xmax", "ymax", "confidence", "class", "name"]
    np.testing.assert_allclose(frames[1][["xmin", "ymin", "xmax", "ymax", "confidence", "class"]].to_numpy(),
                               r.xyxy[1].numpy(), rtol=1e-6)
    assert list(r.pandas("xywhn")[0].columns[:4]) == ["xcenter", "ycenter", "width", "height"]
