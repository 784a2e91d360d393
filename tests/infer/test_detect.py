"""detect.py and utils.infer.sources: folders, videos, label round-trips, crops, bad inputs, flat memory."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

import detect
from tests.backend_helpers import make_checkpoint, make_images, make_video
from utils.core.draw import draw_boxes
from utils.infer.backend import BackendError
from utils.infer.sources import LoadSource, SourceError, resolve_source, stream_name

NAMES = ["cell", "blob"]
COMMON = {"imgsz": 64, "conf_thres": 0.25, "max_det": 4}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny checkpoint whose objectness bias is high, so every image gets detections."""
    return make_checkpoint(tmp_path_factory.mktemp("w") / "best.pt", names=NAMES, obj_logit=3.0)


def _rss_bytes() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _read_labels(f: Path, shape: tuple[int, int]) -> np.ndarray:
    """labels txt -> [n, 6] x1, y1, x2, y2 (pixels), conf, cls."""
    rows = np.loadtxt(f, ndmin=2).reshape(-1, 6)
    h, w = shape
    cls, cx, cy, bw, bh, conf = rows.T
    return np.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h, conf, cls], 1)


def test_folder_writes_images_labels_crops_and_round_trips(weights, tmp_path, caplog):
    src = tmp_path / "imgs"
    files = make_images(src, n=3, size=(80, 60))
    (src / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (src / "notes.md").write_text("ignored: not an image")
    with caplog.at_level(logging.WARNING):
        det = detect.Detector(detect.DetectOptions(weights=weights, source=src, project=tmp_path / "runs",
                                                   save_txt=True, save_conf=True, save_crop=True,
                                                   line_thickness=2, **COMMON))
        results = list(det.frames())
    assert "broken.jpg" in caplog.text and "skipped" in caplog.text
    out = tmp_path / "runs" / "exp"
    assert det.save_dir == out and len(results) == 3
    assert sorted(p.name for p in out.glob("*.png")) == [f.name for f in files]
    assert det.writer.counts["labels"] == 3 and det.writer.counts["crops"] == sum(len(r.det) for r in results)
    assert {p.name for p in (out / "crops").iterdir()} <= set(NAMES)
    for r, f in zip(results, files):
        img = cv2.imread(str(f))
        assert 1 <= len(r.det) <= 4 and (r.det[:, 4] > 0.25).all()
        back = _read_labels(out / "labels" / f"{f.stem}.txt", img.shape[:2])
        # txt (normalised, 6 decimals) -> pixels equals the detections after clipping to the image
        clipped = r.det.copy()
        clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(0, img.shape[1])
        clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(0, img.shape[0])
        np.testing.assert_allclose(back, clipped, atol=1e-3)
        # re-drawing the boxes read back from txt reproduces the saved annotated image
        redrawn = draw_boxes(img.copy(), back[:, :4], back[:, 5], back[:, 4], NAMES, line_thickness=2)
        saved = cv2.imread(str(out / f.name))
        assert (saved != img).any(), "nothing was drawn"
        assert (redrawn != saved).any(axis=2).mean() < 0.01
    summary = det.summary()
    assert "ms pre-process" in summary and "ms inference" in summary and "ms NMS" in summary and str(out) in summary


def test_video_outputs_fps_size_and_per_frame_labels(weights, tmp_path):
    video = make_video(tmp_path / "clip.mp4", n=12, size=(96, 64), fps=10.0)
    det = detect.run(weights=weights, source=video, project=tmp_path / "runs", save_txt=True, **COMMON)
    out = det.save_dir
    cap = cv2.VideoCapture(str(out / "clip.mp4"))
    got = (cap.get(cv2.CAP_PROP_FPS), cap.get(cv2.CAP_PROP_FRAME_WIDTH), cap.get(cv2.CAP_PROP_FRAME_HEIGHT),
           cap.get(cv2.CAP_PROP_FRAME_COUNT))
    cap.release()
    assert got == (10.0, 96, 64, 12)
    assert sorted(p.name for p in (out / "labels").iterdir()) == sorted(f"clip_{i}.txt" for i in range(12))
    # vid_stride keeps every 3rd frame, numbered by its position in the source
    det = detect.run(weights=weights, source=video, project=tmp_path / "runs", save_txt=True, nosave=True,
                     vid_stride=3, **COMMON)
    assert sorted(p.name for p in (det.save_dir / "labels").iterdir()) == [f"clip_{i}.txt" for i in (0, 3, 6, 9)]
    assert not list(det.save_dir.glob("*.mp4")) and det.save_dir.name == "exp2"


def test_onnx_weights_give_the_same_detections(weights, tmp_path):
    import export

    onnx_file = export.run(weights, include=["onnx"], imgsz=64, outdir=tmp_path, threads=1)["onnx"]
    src = tmp_path / "imgs"
    make_images(src, n=2, size=(64, 64))
    a = list(detect.Detector(detect.DetectOptions(weights=weights, source=src, nosave=True, project=tmp_path / "r",
                                                  **COMMON)).frames())
    b = list(detect.Detector(detect.DetectOptions(weights=onnx_file, source=src, nosave=True,
                                                  project=tmp_path / "r", **COMMON)).frames())
    for ra, rb in zip(a, b):
        np.testing.assert_allclose(ra.det, rb.det, atol=1e-3)


def test_list_glob_and_classes(weights, tmp_path):
    files = make_images(tmp_path / "a", n=2) + make_images(tmp_path / "b", n=1, ext=".jpg")
    lst = tmp_path / "list.txt"
    lst.write_text(f"# my images\n{files[0]}\n\nb/{files[2].name}\nmissing.png\n")
    assert resolve_source(lst) == [str(files[0]), str(tmp_path / "b" / files[2].name)]
    assert resolve_source(tmp_path / "a" / "*.png") == [str(f) for f in files[:2]]
    det = detect.run(weights=weights, source=str(tmp_path / "a" / "*.png"), classes=[1], project=tmp_path / "r",
                     nosave=True, **COMMON)
    assert det.speed.n == 2
    with pytest.raises(detect.DetectError, match="--classes \\[5\\]"):
        detect.run(weights=weights, source=lst, classes=[5], project=tmp_path / "r", **COMMON)


def test_to_tensor_matches_the_reference_conversion_and_is_channels_last():
    import torch

    img = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    x = detect.to_tensor(img)
    ref = torch.from_numpy(np.ascontiguousarray(img[..., ::-1].transpose(2, 0, 1))).float().div(255)[None]
    assert x.shape == (1, 3, 64, 96) and x.dtype == torch.float32 and torch.equal(x, ref)
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_sources_parse_streams_and_webcams():
    assert resolve_source("0") == ["0"] and stream_name("0") == "webcam0"
    assert resolve_source("rtsp://cam.local:554/live") == ["rtsp://cam.local:554/live"]
    assert stream_name("rtsp://cam.local:554/live") == "rtsp_cam_local_554_live"


def test_stream_url_is_read_frame_by_frame(weights, tmp_path):
    import functools
    import http.server
    import threading

    make_video(tmp_path / "cam.mp4", n=6, size=(64, 64), fps=5.0)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/cam.mp4"
        det = detect.run(weights=weights, source=url, project=tmp_path / "r", save_txt=True, **COMMON)
    finally:
        server.shutdown()
        server.server_close()
    stem = stream_name(url)
    assert det.speed.n == 6 and (det.save_dir / f"{stem}.mp4").is_file()
    assert sorted(p.name for p in (det.save_dir / "labels").iterdir()) == sorted(f"{stem}_{i}.txt" for i in range(6))
    with pytest.raises(SourceError, match="could not open video/stream"):
        LoadSource("rtsp://127.0.0.1:9/nothing")


def test_bad_inputs_give_one_clear_error_each(weights, tmp_path):
    project = tmp_path / "runs"
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no images or videos found"):
        detect.run(weights=weights, source=tmp_path / "empty", project=project)
    (tmp_path / "bad.mp4").write_bytes(b"\x00\x01 definitely not a video" * 10)
    with pytest.raises(SourceError, match="bad.mp4: could not open video"):
        detect.run(weights=weights, source=tmp_path / "bad.mp4", project=project)
    with pytest.raises(SourceError, match="source not found"):
        detect.run(weights=weights, source=tmp_path / "nothing_here.jpg", project=project)
    with pytest.raises(SourceError, match="unsupported file type '.md'"):
        (tmp_path / "x.md").write_text("hi")
        detect.run(weights=weights, source=tmp_path / "x.md", project=project)
    img = make_images(tmp_path / "ok", n=1)[0]
    with pytest.raises(BackendError, match="weights file not found"):
        detect.run(weights=tmp_path / "missing.pt", source=img, project=project)
    (tmp_path / "notamodel.onnx").write_text("hello")
    with pytest.raises(BackendError, match="not a valid ONNX model"):
        detect.run(weights=tmp_path / "notamodel.onnx", source=img, project=project)
    with pytest.raises(detect.DetectError, match="--conf-thres"):
        detect.run(weights=weights, source=img, conf_thres=1.5, project=project)
    assert not project.exists(), "a failed start must not leave an empty run folder"


def test_cli_without_trained_weights_says_train_first(tmp_path, monkeypatch, capsys):
    from utils.core.errors import cli_main

    monkeypatch.setattr(detect, "TRAIN_RUNS", tmp_path / "runs" / "train")
    assert cli_main("detect.py", detect.main, ["--project", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train first" in err and err.startswith("detect.py: error:")
    assert cli_main("detect.py", detect.main, ["--weights", str(tmp_path / "none.pt")]) == 2
    assert "none.pt: weights file not found" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_cli_default_picks_newest_best(weights, tmp_path, monkeypatch):
    runs = tmp_path / "runs" / "train"
    for name, age in (("exp", 100), ("exp2", 0)):
        f = runs / name / "weights" / "best.pt"
        f.parent.mkdir(parents=True)
        f.write_bytes(weights.read_bytes())
        os.utime(f, (f.stat().st_atime - age, f.stat().st_mtime - age))
    assert detect.newest_best(runs) == runs / "exp2" / "weights" / "best.pt"


def test_view_img_on_headless_machine_warns_once(weights, tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    make_images(tmp_path / "imgs", n=2)
    with caplog.at_level(logging.WARNING):
        detect.run(weights=weights, source=tmp_path / "imgs", view_img=True, project=tmp_path / "r", **COMMON)
    assert caplog.text.count("--view-img") == 1


def test_view_img_when_opencv_cannot_open_windows_warns_once(weights, tmp_path, caplog, monkeypatch):
    import utils.infer.writers as outputs

    calls = []

    def no_gui(*args):
        calls.append(args)
        raise cv2.error("The function is not implemented (headless build)")

    monkeypatch.setenv("DISPLAY", ":0")
    monkeypatch.setattr(outputs.cv2, "imshow", no_gui)
    make_images(tmp_path / "imgs", n=3)
    with caplog.at_level(logging.WARNING):
        det = detect.run(weights=weights, source=tmp_path / "imgs", view_img=True, project=tmp_path / "r", **COMMON)
    assert len(calls) == 1 and caplog.text.count("cannot open windows") == 1 and det.speed.n == 3


@pytest.mark.slow
def test_memory_stays_flat_over_500_video_frames(weights, tmp_path):
    video = make_video(tmp_path / "long.mp4", n=500, size=(64, 64), fps=25.0)
    assert len(LoadSource(video)) == 500
    det = detect.Detector(detect.DetectOptions(weights=weights, source=video, project=tmp_path / "r",
                                               save_txt=True, **COMMON))
    rss = {}
    for i, _ in enumerate(det.frames()):
        if i in (100, 499):
            rss[i] = _rss_bytes()
    growth = (rss[499] - rss[100]) / 2**20
    print(f"RSS {rss[100] / 2**20:.1f} MiB at frame 100, growth to frame 499: {growth:+.2f} MiB")
    assert det.speed.n == 500 and len(list((det.save_dir / "labels").iterdir())) == 500
    assert growth < 8.0, f"RSS grew {growth:.1f} MiB over 400 frames"


def test_pt_weights_warm_up_on_the_first_frames_shape(weights, tmp_path, monkeypatch):
    from utils.infer.backend import DetectBackend

    seen, real = [], DetectBackend.warmup
    monkeypatch.setattr(DetectBackend, "warmup", lambda self, imgsz=None: seen.append(imgsz) or real(self, imgsz))
    src = make_images(tmp_path / "imgs", n=2, size=(96, 64))[0].parent  # landscape: 64x96 letterboxed
    det = detect.Detector(detect.DetectOptions(weights=weights, source=src, imgsz=96, nosave=True, project=tmp_path))
    assert seen == []  # not warmed up on the square --imgsz
    frames = list(det.frames())
    assert len(frames) == 2 and seen == [(64, 96)]  # once, on the first frame's letterboxed shape


def test_detect_runs_the_predictors_code_and_names_its_flags(weights, tmp_path, caplog, monkeypatch):
    from utils.infer.predictor import Predictor

    src = make_images(tmp_path / "imgs", n=2, size=(80, 60))[0].parent
    with caplog.at_level(logging.WARNING):
        det = detect.Detector(detect.DetectOptions(weights=weights, source=src, imgsz=70, nosave=True,
                                                   project=tmp_path / "r"))
    assert "--imgsz 70 70 is not a multiple of the stride 16; using 80 80" in caplog.text and det.imgsz == (80, 80)
    assert isinstance(det.predictor, Predictor) and det.predictor.backend is det.backend
    calls = []
    real = Predictor.postprocess
    monkeypatch.setattr(Predictor, "postprocess", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    frames = list(det.frames())
    assert len(frames) == 2 and len(calls) == 2  # one prediction path: detect.py's NMS is the predictor's
    got = det.predictor(src)
    for r, boxes in zip(frames, got.xyxy):
        np.testing.assert_allclose(r.det, boxes.numpy(), rtol=1e-5, atol=1e-4)
