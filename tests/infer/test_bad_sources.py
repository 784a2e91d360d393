"""Bad detect.py sources of docs/RELIABILITY.md: broken videos, unreachable streams, missing cameras, empty
globs, symlink loops, unreadable or huge images among good ones. Everything is local and tiny."""
from __future__ import annotations

import functools
import http.server
import logging
import os
import socket
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

import detect
from tests.backend_helpers import make_checkpoint, make_images, png_header_only
from utils.infer.sources import LoadSource, SourceError, resolve_source, stream_timeout

COMMON = {"imgsz": 64, "conf_thres": 0.25, "max_det": 4}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("w") / "best.pt", obj_logit=3.0)


def _avi(path: Path, n: int = 40, size: tuple[int, int] = (64, 48)) -> Path:
    """An MJPG AVI of n noise frames: its header states the frame count, so a cut is detectable."""
    w, h = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (w, h))
    assert writer.isOpened()
    rng = np.random.default_rng(0)
    for _ in range(n):
        writer.write(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    writer.release()
    return path


def _broken_avi(path: Path) -> Path:
    """40 frames declared, the file cut in half: OpenCV opens it and reads about 20."""
    full = _avi(path.with_name("full.avi")).read_bytes()
    path.write_bytes(full[: len(full) // 2])
    return path


def test_video_that_breaks_halfway_keeps_its_frames_and_names_the_break(weights, tmp_path, caplog, capsys) -> None:
    video = _broken_avi(tmp_path / "broken.avi")
    with caplog.at_level(logging.WARNING):
        det = detect.run(weights=weights, source=video, project=tmp_path / "runs", save_txt=True, **COMMON)
    n = det.speed.n
    assert 5 < n < 40  # the frames before the break were processed
    labels = sorted((det.save_dir / "labels").iterdir())
    assert len(labels) == n  # ... and their results kept
    out = cv2.VideoCapture(str(det.save_dir / "broken.mp4"))
    assert int(out.get(cv2.CAP_PROP_FRAME_COUNT)) == n  # the annotated video is complete up to the break
    assert f"{video}: video breaks off after frame {n - 1} of 40 (truncated or corrupt file)" in caplog.text
    assert capsys.readouterr().out.rstrip().endswith(". 1 video cut short: see above")


def test_a_complete_video_gives_no_warning(tmp_path, caplog) -> None:
    """The control for the test above: the break warning is not raised for a whole file."""
    src = LoadSource(_avi(tmp_path / "whole.avi", n=12))
    with caplog.at_level(logging.WARNING):
        assert sum(1 for _ in src) == 12
    assert caplog.text == "" and src.skipped_note() == ""


@pytest.fixture()
def silent_server():
    """A TCP port that accepts connections and never answers: a stream that hangs."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    conns: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conns.append(srv.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield srv.getsockname()[1]
    srv.close()
    for c in conns:
        c.close()


@pytest.mark.parametrize("scheme", ["http", "rtsp"])
def test_stream_that_never_answers_times_out_with_a_clear_error(silent_server, scheme) -> None:
    url = f"{scheme}://127.0.0.1:{silent_server}/live"
    t0 = time.monotonic()
    with pytest.raises(SourceError) as e:
        LoadSource(url, timeout_s=1.0)
    took = time.monotonic() - t0
    assert took < 15  # OpenCV's own default would wait 30 s per open
    assert str(e.value) == (f"{url}: could not open video/stream: stream unreachable, no answer within 1 s "
                            f"(the limit; set MOBILEYOLO_STREAM_TIMEOUT to change it)")


def test_stream_on_a_closed_port_fails_at_once(weights, tmp_path, monkeypatch) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    monkeypatch.setenv("MOBILEYOLO_STREAM_TIMEOUT", "2")
    for url in (f"rtsp://127.0.0.1:{port}/x", f"http://127.0.0.1:{port}/x.mp4"):
        with pytest.raises(SourceError, match=f"{url}: could not open video/stream: connection refused"):
            detect.run(weights=weights, source=url, project=tmp_path / "runs", **COMMON)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("value", ["soon", "0", "-3", "nan"])
def test_bad_stream_timeout_setting_is_named(monkeypatch, value) -> None:
    monkeypatch.setenv("MOBILEYOLO_STREAM_TIMEOUT", value)
    with pytest.raises(SourceError, match=f"MOBILEYOLO_STREAM_TIMEOUT='{value}': expected seconds"):
        stream_timeout()


def test_camera_index_that_does_not_exist(weights, tmp_path) -> None:
    index = next(i for i in range(60, 100) if not os.path.exists(f"/dev/video{i}"))
    with pytest.raises(SourceError, match=f"camera {index}: no such camera, or it is in use"):
        detect.run(weights=weights, source=str(index), project=tmp_path / "runs", **COMMON)
    assert not (tmp_path / "runs").exists()


def test_empty_folder_and_glob_matching_nothing(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("no media here")
    with pytest.raises(SourceError, match=r"folder .*empty: no images or videos found"):
        LoadSource(tmp_path / "empty")
    pattern = str(tmp_path / "nothing" / "*.jpg")
    with pytest.raises(SourceError) as e:
        LoadSource(pattern)
    assert str(e.value).startswith(f"glob '{pattern}': no images or videos found (images: jpg, ")
    with pytest.raises(SourceError, match=r"no images or videos found"):
        LoadSource(str(tmp_path / "**" / "*.png"))


def test_glob_through_symlink_loops_reads_each_file_once(tmp_path, caplog) -> None:
    root = tmp_path / "imgs"
    make_images(root, n=2)
    os.symlink("..", root / "up")  # root/up -> tmp_path: a loop back through root
    os.symlink(root, root / "again")
    (root / "sub").mkdir()
    os.symlink(root, root / "sub" / "back")
    with caplog.at_level(logging.WARNING):
        files = resolve_source(str(root / "**" / "*.png"))
    assert [Path(f).name for f in files] == ["img0.png", "img1.png"]
    assert "reached again through symlinks" in caplog.text


def test_unreadable_and_huge_images_among_good_ones_are_skipped_and_counted(weights, tmp_path, caplog,
                                                                             capsys) -> None:
    folder = tmp_path / "mix"
    make_images(folder, n=2)
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    png_header_only(folder / "huge.png", 20000, 20000)
    with caplog.at_level(logging.WARNING):
        det = detect.run(weights=weights, source=folder, project=tmp_path / "runs", **COMMON)
    assert det.speed.n == 2
    for name in ("zero.jpg", "text.png"):
        assert f"{folder / name}: image could not be decoded; skipped" in caplog.text
    assert f"{folder / 'huge.png'}: image is 400 MP, over the 179 MP limit" in caplog.text
    assert capsys.readouterr().out.rstrip().endswith(". 3 images skipped: see above")


def test_a_single_huge_image_is_an_error(weights, tmp_path) -> None:
    f = png_header_only(tmp_path / "huge.png", 20000, 20000)
    with pytest.raises(SourceError, match="huge.png: image is 400 MP, over the 179 MP limit"):
        detect.run(weights=weights, source=f, project=tmp_path / "runs", **COMMON)


def test_a_stream_that_ends_keeps_its_frames_and_says_so(tmp_path, caplog) -> None:
    """An HTTP stream that the sender closes after 6 frames: every frame is read, then one warning."""
    _avi(tmp_path / "cam.avi", n=6)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/cam.avi"
    try:
        src = LoadSource(url, timeout_s=5.0)
        with caplog.at_level(logging.WARNING):
            frames = [f.index for f in src]
    finally:
        server.shutdown()
        server.server_close()
    assert frames == list(range(6))
    assert f"{url}: stream ended after 6 frames" in caplog.text
