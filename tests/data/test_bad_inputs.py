"""Bad images, labels, scan caches and data YAMLs of docs/RELIABILITY.md that the older data tests do not
cover: one test (or one parametrised row) per catalogued case. Every file is tiny and written in tmp_path."""
from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from PIL import Image, ImageOps

from tests.backend_helpers import png_header_only
from utils.data.data_yaml import DataConfigError, check_dataset, list_image_files
from utils.data.dataset import YoloDataset
from utils.data.images import MAX_PIXELS, ImageReadError, read_image, verify_image
from utils.data.scan import cache_path_for, scan_images

BOX = "0 0.5 0.5 0.4 0.4\n"


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def _dirs(root: Path, split: str = "train") -> tuple[Path, Path]:
    img, lab = root / "images" / split, root / "labels" / split
    img.mkdir(parents=True)
    lab.mkdir(parents=True)
    return img, lab


# ---- images ------------------------------------------------------------------------------------------------
def test_wrong_extension_is_read_by_content(tmp_path: Path) -> None:
    """A PNG named .jpg and a JPEG named .png: the header and the decoder go by content, not by name."""
    img, lab = _dirs(tmp_path)
    png_as_jpg, jpg_as_png = img / "really_png.jpg", img / "really_jpeg.png"
    png_as_jpg.write_bytes(cv2.imencode(".png", _noise(48, 64))[1].tobytes())
    jpg_as_png.write_bytes(cv2.imencode(".jpg", _noise(48, 64))[1].tobytes())
    for f in (png_as_jpg, jpg_as_png):
        (lab / f"{f.stem}.txt").write_text(BOX)
        assert verify_image(f) == ((64, 48), "")
        assert read_image(f).shape == (48, 64, 3)
    # the loader's reduced decode picks its flag from the suffix: it must work on a PNG named .jpg too
    assert read_image(png_as_jpg, max_side=16, size_hint=(64, 48)).shape[2] == 3
    res = scan_images([str(png_as_jpg), str(jpg_as_png)], nc=1)
    assert len(res.im_files) == 2 and res.n_corrupt == 0 and all(len(lb) == 1 for lb in res.labels)


@pytest.mark.parametrize("h, w", [(1, 1), (1, 40), (9, 9)])
def test_tiny_images_are_skipped_and_named(tmp_path: Path, h: int, w: int) -> None:
    f = tmp_path / "tiny.png"
    cv2.imwrite(str(f), _noise(h, w))
    size, why = verify_image(f)
    assert size is None and why == f"{f}: image is {w}x{h}, under 10 px; image skipped"


def _jpeg_claiming(path: Path, w: int, h: int) -> Path:
    """A small real JPEG whose SOF0 header is patched to claim w x h."""
    data = bytearray(cv2.imencode(".jpg", _noise(16, 16))[1].tobytes())
    i = data.index(b"\xff\xc0")
    data[i + 5:i + 9] = struct.pack(">HH", h, w)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("make", [png_header_only, _jpeg_claiming], ids=["png", "jpeg"])
def test_huge_image_is_refused_from_its_header(tmp_path: Path, make, monkeypatch) -> None:
    """20000 x 20000 (1.2 GB as BGR): refused from the header; no decoder is ever called."""
    f = make(tmp_path / f"huge.{'png' if make is png_header_only else 'jpg'}", 20000, 20000)

    def no_decode(*a, **k):
        raise AssertionError("a huge image reached the decoder")

    monkeypatch.setattr(cv2, "imdecode", no_decode)
    size, why = verify_image(f)
    assert size is None and why.startswith(f"{f}: image is 400 MP, over the {MAX_PIXELS / 1e6:.0f} MP limit")
    with pytest.raises(ImageReadError, match="400 MP, over the 179 MP limit"):
        read_image(f)  # detect.py's path: no scan before it
    res = scan_images([str(f)], use_cache=False)
    assert res.n_corrupt == 1 and res.im_files == []


def test_cmyk_jpeg_decodes_to_bgr(tmp_path: Path) -> None:
    bgr = _noise(48, 64)
    f = tmp_path / "cmyk.jpg"
    Image.fromarray(bgr[..., ::-1]).convert("CMYK").save(f, quality=95)
    assert Image.open(f).mode == "CMYK"
    img = read_image(f)
    assert img.shape == (48, 64, 3) and img.dtype == np.uint8
    assert np.abs(img.astype(int) - bgr).mean() < 20  # the colours, not inverted or channel-swapped


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pil_exif_transpose(tmp_path: Path, orientation: int) -> None:
    """Four coloured quadrants tell all 8 orientations apart; PIL's exif_transpose is the reference."""
    stored = np.zeros((40, 80, 3), np.uint8)
    stored[:20, :40], stored[:20, 40:], stored[20:, :40], stored[20:, 40:] = (0, 0, 255), (0, 255, 0), (255, 0, 0), 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    f = tmp_path / f"o{orientation}.jpg"
    Image.fromarray(stored[..., ::-1]).save(f, exif=exif.tobytes(), quality=95)
    want = np.asarray(ImageOps.exif_transpose(Image.open(f)).convert("RGB"))[..., ::-1].astype(int)
    got = read_image(f)
    assert got.shape == want.shape and np.abs(got.astype(int) - want).mean() < 4
    assert verify_image(f)[0] == (want.shape[1], want.shape[0])  # (w, h) as displayed: labels refer to it
    small = read_image(f, max_side=20, size_hint=(want.shape[1], want.shape[0]))  # reduced decode: same turn
    assert small.shape[:2] == (want.shape[0] // 4, want.shape[1] // 4)  # 1/4 scale, long side still >= 20
    ref = cv2.resize(want.astype(np.uint8), small.shape[1::-1], interpolation=cv2.INTER_AREA)
    assert np.abs(small.astype(int) - ref).mean() < 12


def test_non_utf8_and_space_file_names_survive_scan_cache_and_read(tmp_path: Path, caplog) -> None:
    img, lab = _dirs(tmp_path)
    good = img / os.fsdecode(b"caf\xe9 \xff photo 1.jpg")  # Latin-1 bytes: not valid UTF-8
    bad = img / os.fsdecode(b"broken \xfe.jpg")
    try:
        cv2.imencode(".jpg", _noise(32, 32))[1].tofile(str(good))
        bad.write_bytes(b"")
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses non-UTF-8 names")
    Path(str(lab / good.stem) + ".txt").write_text(BOX)
    files = list_image_files([img])
    assert sorted(files) == sorted([str(bad), str(good)])
    with caplog.at_level(logging.WARNING):
        first = scan_images(files, nc=1)
    again = scan_images(files, nc=1)  # the JSON cache round-trips the name
    for res in (first, again):
        assert res.im_files == [str(good)] and len(res.labels[0]) == 1 and res.n_corrupt == 1
    assert again.from_cache and f"{bad}: zero-byte file" in caplog.text
    assert read_image(good).shape == (32, 32, 3)


def test_symlink_loops_in_a_dataset_folder_are_not_followed(tmp_path: Path) -> None:
    img, lab = _dirs(tmp_path)
    cv2.imwrite(str(img / "a.jpg"), _noise(32, 32))
    (lab / "a.txt").write_text(BOX)
    os.symlink("..", img / "up")  # a loop: images/train/up/train/up/...
    os.symlink(img / "self", img / "self")  # a link to itself (ELOOP when followed)
    (img / "sub").mkdir()
    os.symlink(img, img / "sub" / "back")
    assert list_image_files([img]) == [str(img / "a.jpg")]  # once, and the walk ends
    ds = YoloDataset([img], imgsz=64, augment=True)
    assert len(ds) == 1


# ---- labels --------------------------------------------------------------------------------------------------
LABEL_FILES = [  # id, label file bytes, rows kept, message fragment (None: no warning)
    ("missing-column", b"0 0.5 0.5 0.2\n" + BOX.encode(), 1, ":1: expected 5 columns"),
    ("text-in-number", b"0 0.5 abc 0.2 0.2\n" + BOX.encode(), 1, ":1: non-numeric token 'abc'"),
    ("class-out-of-range", BOX.encode() + b"3 0.5 0.5 0.2 0.2\n", 1, ":2: class 3 >= nc=2; row dropped"),
    ("negative-class", b"-1 0.5 0.5 0.2 0.2\n" + BOX.encode(), 1, ":1: class must be a non-negative integer"),
    ("non-integer-class", b"0.5 0.5 0.5 0.2 0.2\n" + BOX.encode(), 1, ":1: class must be a non-negative integer"),
    ("zero-size", b"0 0.5 0.5 0 0.2\n" + BOX.encode(), 1, ":1: width/height must be > 0"),
    ("negative-size", b"0 0.5 0.5 0.2 -0.2\n" + BOX.encode(), 1, ":1: width/height must be > 0"),
    ("outside-0-1-dropped", b"0 1.3 0.5 0.2 0.2\n" + BOX.encode(), 1, ":1: coordinates outside 0..1"),
    ("just-outside-clipped", b"0 0.5 0.5 1.01 0.2\n", 1, None),
    ("duplicate-rows", BOX.encode() * 3, 1, "2 duplicate row(s) removed (line 2, 3)"),
    ("crlf", b"0 0.5 0.5 0.4 0.4\r\n1 0.2 0.2 0.1 0.1\r\n", 2, None),
    ("bom", b"\xef\xbb\xbf" + BOX.encode(), 1, None),
    ("empty-file", b"", 0, None),
    ("odd-segment", b"0 0.1 0.1 0.5 0.1 0.3 0.6 0.2\n" + BOX.encode(), 1, ":1: expected 5 columns"),
    ("nan", b"0 nan 0.5 0.2 0.2\n" + BOX.encode(), 1, ":1: non-finite number"),
]


@pytest.mark.parametrize("content, kept, fragment", [c[1:] for c in LABEL_FILES], ids=[c[0] for c in LABEL_FILES])
def test_bad_label_rows_through_the_scan(tmp_path: Path, content: bytes, kept: int, fragment: str | None) -> None:
    """Each bad row is dropped with `file:line: why`, the good rows stay, and the image stays."""
    img, lab = _dirs(tmp_path)
    cv2.imwrite(str(img / "a.jpg"), _noise(32, 32))
    (lab / "a.txt").write_bytes(content)
    res = scan_images([str(img / "a.jpg")], nc=2)
    assert res.im_files == [str(img / "a.jpg")] and len(res.labels[0]) == kept
    if fragment is None:
        assert res.msgs == []
    else:
        assert len(res.msgs) == 1 and res.msgs[0].startswith(str(lab / "a.txt")) and fragment in res.msgs[0]
    assert ((res.labels[0][:, 1:] >= 0) & (res.labels[0][:, 1:] <= 1)).all()  # clipped rows stay in 0..1


def test_label_with_no_image_is_named_once_per_folder(tmp_path: Path, caplog, capsys) -> None:
    img, lab = _dirs(tmp_path)
    cv2.imwrite(str(img / "a.jpg"), _noise(32, 32))
    (lab / "a.txt").write_text(BOX)
    (lab / "orphan.txt").write_text(BOX)
    (img / "anim.gif").write_bytes(b"GIF89a")  # not an image format the dataset reads: its label is an orphan
    (lab / "anim.txt").write_text(BOX)
    with caplog.at_level(logging.WARNING):
        ds = YoloDataset([img], imgsz=64, augment=True)
    assert len(ds) == 1
    want = f"{lab}: 2 label file(s) match no image in {img} (anim.txt, orphan.txt); ignored"
    assert want in caplog.text and "1 warnings" in capsys.readouterr().out


def test_the_scan_line_counts_what_was_skipped(tmp_path: Path, capsys) -> None:
    img, lab = _dirs(tmp_path)
    for name in ("a", "b"):
        cv2.imwrite(str(img / f"{name}.jpg"), _noise(32, 32))
    (img / "zero.jpg").write_bytes(b"")
    (img / "text.jpg").write_text("not an image")
    (lab / "a.txt").write_text(BOX + "0 0.5 0.5 0.2\n7 0.5 0.5 0.1 0.1\n")
    (lab / "b.txt").write_text("x 0.5 0.5 0.1 0.1\n")
    ds = YoloDataset([img], imgsz=64, nc=2)
    out = capsys.readouterr().out
    assert "2 images, 1 backgrounds, 2 corrupt" in out
    assert ds.skip_note == "2 images skipped, 3 label rows dropped: see above" and ds.skip_note in out


@pytest.mark.parametrize("damage, why", [
    ("label", "stale (images or labels changed since it was written)"),
    ("version", "written by another version"),
    ("list", "not a scan cache"),
    ("garbage", "unreadable"),
], ids=["label", "version", "list", "garbage"])
def test_stale_or_corrupt_cache_is_rebuilt_with_a_warning(tmp_path: Path, caplog, damage: str, why: str) -> None:
    img, lab = _dirs(tmp_path)
    cv2.imwrite(str(img / "a.jpg"), _noise(32, 32))
    (lab / "a.txt").write_text(BOX)
    files = [str(img / "a.jpg")]
    assert not scan_images(files, nc=1).from_cache
    cpath = cache_path_for(files)
    if damage == "label":
        (lab / "a.txt").write_text(BOX + "0 0.2 0.2 0.1 0.1\n")
        os.utime(lab / "a.txt", ns=(1, 1))
    elif damage == "version":
        cpath.write_text(json.dumps({**json.loads(cpath.read_text()), "version": 0}))
    elif damage == "list":
        cpath.write_text("[1, 2]")
    else:
        cpath.write_bytes(b"\x00{garbage")
    with caplog.at_level(logging.WARNING):
        res = scan_images(files, nc=1)
    assert not res.from_cache and f"{cpath}: scan cache" in caplog.text and why in caplog.text
    assert len(res.labels[0]) == (2 if damage == "label" else 1)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert scan_images(files, nc=1).from_cache and caplog.text == ""  # rebuilt once, then quiet


# ---- data YAML -----------------------------------------------------------------------------------------------
@pytest.fixture()
def ds(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    for split in ("train", "val"):
        img, lab = _dirs(root, split)
        cv2.imwrite(str(img / "a.jpg"), _noise(32, 32))
        (lab / "a.txt").write_text(BOX)
    (root / "images" / "empty").mkdir()
    return root


def _yaml(tmp_path: Path, text: str) -> Path:
    f = tmp_path / "d.yaml"
    f.write_text(text)
    return f


@pytest.mark.parametrize("text, match", [
    ("path: {ds}\ntrain: 5\nval: images/val\nnames: [a]\n", r"'train' must be a folder, list of folders .*got 5"),
    ("path: [1, 2]\ntrain: images/train\nval: images/val\nnames: [a]\n", r"'path' must be a folder name, got \[1, 2\]"),
    ("path: {ds}\ntrain: images/train\nval: images/val\nnames: [a, b]\nnc: many\n", r"nc=many but 'names' has 2"),
    ("path: {ds}\ntrain: [images/train, images/nope]\nval: images/val\nnames: [a]\n",
     r"'train' path does not exist: .*images/nope"),
    ("path: $MOBILEYOLO_TEST_UNSET/ds\ntrain: images/train\nval: images/val\nnames: [a]\n",
     r"'path' uses environment variable \$MOBILEYOLO_TEST_UNSET, which is not set"),
    ("path: {ds}\ntrain: images/train\n  val: images/val\nnames: [a]\n", r"d\.yaml:3:6: not valid YAML \(mapping values"),
    ("path: {ds}\ntrain: [images/train\nval: images/val\n", r"d\.yaml:3:4: not valid YAML \(expected ',' or ']'"),
], ids=["split-not-a-string", "path-not-a-string", "nc-not-a-number", "list-with-one-missing", "unset-env-var",
        "syntax-indent", "syntax-unclosed"])
def test_bad_data_yaml_values(tmp_path: Path, ds: Path, monkeypatch, text: str, match: str) -> None:
    monkeypatch.delenv("MOBILEYOLO_TEST_UNSET", raising=False)
    f = _yaml(tmp_path, text.format(ds=ds))
    with pytest.raises(DataConfigError, match=match) as e:
        check_dataset(f)
    assert str(f) in str(e.value)


@pytest.mark.parametrize("path", ["~/ds", "$DS_PARENT/ds", "${DS_PARENT}/ds"])
def test_home_and_environment_variables_expand(tmp_path: Path, ds: Path, monkeypatch, path: str) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("DS_PARENT", str(tmp_path))
    cfg = check_dataset(_yaml(tmp_path / "ds", yaml.safe_dump(
        {"path": path, "train": "$DS_PARENT/ds/images/train", "val": "~/ds/images/val", "names": ["a"]})))
    assert cfg.path == ds.resolve() and cfg.train == [(ds / "images" / "train").resolve()]
    assert cfg.val == [(ds / "images" / "val").resolve()]


def test_an_empty_split_folder_is_an_error_naming_it(tmp_path: Path, ds: Path) -> None:
    cfg = check_dataset(_yaml(tmp_path, f"path: {ds}\ntrain: images/train\nval: images/empty\nnames: [a]\n"))
    with pytest.raises(DataConfigError, match=r"no images \(jpg, .*\) found in .*images/empty"):
        YoloDataset(cfg.val, imgsz=64)
