"""Image checks, decoding of every format, EXIF orientation, the scan cache and split-level errors."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from utils.data.data_yaml import DataConfigError
from utils.data.dataset import YoloDataset
from utils.data.images import read_image, verify_image
from utils.data.scan import CACHE_VERSION, cache_path_for, scan_images

LABEL = "0 0.5 0.5 0.5 0.5\n"


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def _jpeg_bytes(h: int = 48, w: int = 64) -> bytes:
    return cv2.imencode(".jpg", _noise(h, w))[1].tobytes()


def _make_split(root: Path) -> dict[str, Path]:
    """images/train with one file per case; returns name -> path. Good images get LABEL."""
    img_dir, lab_dir = root / "images" / "train", root / "labels" / "train"
    img_dir.mkdir(parents=True)
    lab_dir.mkdir(parents=True)
    f = {k: img_dir / v for k, v in {
        "good": "good.jpg", "space": "with space é ü.jpg", "gray": "gray.png", "rgba": "rgba.png",
        "palette": "pal.png", "png16": "deep.png", "tif": "t.tiff", "bmp": "b.bmp", "webp": "w.webp",
        "exif": "rot.jpg", "trunc_ok": "trunc_ok.jpg", "background": "bg.jpg", "empty_label": "emptylab.jpg",
        "zero": "zero.jpg", "text": "text.jpg", "trunc_blank": "trunc_blank.jpg", "tiny": "tiny.png",
        "upper": "UPPER.JPG"}.items()}
    for k in ("good", "space", "background", "empty_label", "upper"):
        cv2.imwrite(str(f[k]), _noise(48, 64))
    cv2.imwrite(str(f["gray"]), _noise(48, 64)[..., 0])
    cv2.imwrite(str(f["rgba"]), np.dstack([_noise(48, 64), np.full((48, 64), 128, np.uint8)]))
    Image.fromarray(_noise(48, 64)).convert("P").save(f["palette"])
    cv2.imwrite(str(f["png16"]), (np.random.default_rng(1).random((48, 64, 3)) * 65535).astype(np.uint16))
    cv2.imwrite(str(f["tif"]), _noise(48, 64))
    cv2.imwrite(str(f["bmp"]), _noise(48, 64))
    cv2.imwrite(str(f["webp"]), _noise(48, 64))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 64 wide x 48 high, displayed rotated 90 deg clockwise: 48 wide x 64 high
    Image.fromarray(_noise(48, 64)).save(f["exif"], exif=exif.tobytes())
    data = _jpeg_bytes(96, 128)
    f["trunc_ok"].write_bytes(data[: int(len(data) * 0.7)])
    sos = data.index(b"\xff\xda")  # start of the entropy-coded pixels
    f["trunc_blank"].write_bytes(data[: sos + 40])  # a few blocks at most: the rest would be grey fill
    f["zero"].write_bytes(b"")
    f["text"].write_text("this is not an image")
    cv2.imwrite(str(f["tiny"]), _noise(8, 40))
    (img_dir / "notes.md").write_text("ignored: not an image extension")
    for k, p in f.items():
        if k != "background":
            (lab_dir / p.with_suffix(".txt").name).write_text("" if k == "empty_label" else LABEL)
    return f


@pytest.fixture()
def split(tmp_path: Path) -> dict[str, Path]:
    return _make_split(tmp_path)


def test_scan_counts_and_named_warnings(split: dict[str, Path], caplog, capsys) -> None:
    files = sorted(str(p) for p in split.values())
    with caplog.at_level(logging.WARNING):
        res = scan_images(files, nc=1)
    bad = {"zero", "text", "trunc_blank", "tiny"}
    assert sorted(res.im_files) == sorted(str(p) for k, p in split.items() if k not in bad)
    assert res.n_corrupt == 4 and res.n_background == 2 and not res.from_cache
    out = capsys.readouterr().out
    assert f"{len(split) - 4} images, 2 backgrounds, 4 corrupt" in out
    for k, why in [("zero", "zero-byte"), ("text", "not a readable image"), ("tiny", "under 10 px"),
                   ("trunc_blank", "rows decode (rest is blank fill)"), ("trunc_ok", "read tolerantly")]:
        assert any(str(split[k]) in m and why in m for m in res.msgs), (k, res.msgs)
    assert str(split["zero"]) in caplog.text
    shapes = dict(zip(res.im_files, res.shapes.tolist()))
    assert shapes[str(split["exif"])] == [48, 64]  # (w, h) as displayed, not as stored
    assert shapes[str(split["good"])] == [64, 48]


@pytest.mark.parametrize("key", ["good", "space", "gray", "rgba", "palette", "png16", "tif", "bmp", "webp",
                                 "trunc_ok", "upper"])
def test_read_image_formats_are_bgr_uint8(split: dict[str, Path], key: str) -> None:
    img = read_image(split[key])
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert float(img.std()) > 10  # real content, not a silently black or flat image


def test_exif_orientation_applied_and_labels_follow_display(tmp_path: Path) -> None:
    stored = np.full((40, 80, 3), 100, np.uint8)
    stored[:10, :20] = (0, 0, 255)  # red patch at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 deg clockwise: the patch moves to the top-right
    p = tmp_path / "r.jpg"
    Image.fromarray(stored[..., ::-1]).save(p, exif=exif.tobytes(), quality=95)
    img = read_image(p)
    assert img.shape[:2] == (80, 40)
    assert img[5, 35, 2] > 200 and img[5, 5, 2] < 150
    assert verify_image(p)[0] == (40, 80)
    small = read_image(p, max_side=40, size_hint=(40, 80))  # reduced decode keeps the orientation too
    assert small.shape[:2] == (40, 20) and small[2, 17, 2] > 200


def test_cache_reused_rebuilt_when_stale_and_when_corrupt(split: dict[str, Path], caplog) -> None:
    files = sorted(str(p) for p in split.values())
    first = scan_images(files, nc=1)
    cpath = cache_path_for(files)
    assert cpath.name == "train.cache" and cpath.parent.name == "labels"
    assert json.loads(cpath.read_text())["version"] == CACHE_VERSION  # plain JSON, safe to load
    assert not [p for p in cpath.parent.iterdir() if p.name.endswith(".tmp")]
    again = scan_images(files, nc=1)
    assert again.from_cache and again.im_files == first.im_files
    lab = split["good"].parents[2] / "labels" / "train" / "good.txt"
    lab.write_text("0 0.5 0.5 0.5 0.5\n0 0.2 0.2 0.1 0.1\n1 0.7 0.7 0.1 0.1\n")
    os.utime(lab, ns=(1, 1))  # a different mtime even on coarse-clock file systems
    stale = scan_images(files, nc=1)
    assert not stale.from_cache
    assert len(stale.labels[stale.im_files.index(str(split["good"]))]) == 2
    assert f"{lab}:3: class 1 >= nc=1; row dropped" in stale.msgs
    wider = scan_images(files, nc=2)  # the class check runs after loading: one cache serves any nc
    assert wider.from_cache and len(wider.labels[wider.im_files.index(str(split["good"]))]) == 3
    cpath.write_bytes(b"\x00garbage{")
    with caplog.at_level(logging.WARNING):
        rebuilt = scan_images(files, nc=2)
    assert not rebuilt.from_cache and "scan cache unreadable" in caplog.text
    assert scan_images(files, nc=2).from_cache


def test_split_with_no_usable_image(tmp_path: Path) -> None:
    d = tmp_path / "images" / "val"
    d.mkdir(parents=True)
    (d / "a.jpg").write_bytes(b"")
    (d / "b.png").write_text("nope")
    with pytest.raises(DataConfigError, match="no usable image.*2 are corrupt"):
        YoloDataset([d], imgsz=64)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataConfigError, match="no images"):
        YoloDataset([empty], imgsz=64)


def test_train_split_without_labels(tmp_path: Path) -> None:
    d = tmp_path / "images" / "train"
    d.mkdir(parents=True)
    for i in range(2):
        cv2.imwrite(str(d / f"{i}.jpg"), _noise(32, 32, i))
    with pytest.raises(DataConfigError, match="no labels"):
        YoloDataset([d], imgsz=64, augment=True)
    ds = YoloDataset([d], imgsz=64, augment=False)  # a background-only val split is legal
    assert len(ds) == 2 and all(len(lb) == 0 for lb in ds.labels)


def test_undecodable_label_file_skips_its_image(tmp_path: Path, caplog) -> None:
    d, lab = tmp_path / "images" / "train", tmp_path / "labels" / "train"
    d.mkdir(parents=True)
    lab.mkdir(parents=True)
    for name in ("a", "b"):
        cv2.imwrite(str(d / f"{name}.jpg"), _noise(32, 32))
    (lab / "a.txt").write_text(LABEL)
    (lab / "b.txt").write_bytes(b"\xff\xfe\x00garbage\x81")
    with caplog.at_level(logging.WARNING):
        res = scan_images([str(d / "a.jpg"), str(d / "b.jpg")], nc=1)
    assert res.im_files == [str(d / "a.jpg")] and res.n_corrupt == 1
    assert f"{lab / 'b.txt'}: label file unreadable" in caplog.text
