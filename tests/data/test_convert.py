"""COCO JSON and Pascal VOC XML -> YOLO labels: round trips, bad input and the CLI."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from utils.data.convert import coco2yolo, main, voc2yolo
from utils.data.labels import parse_label_file

REPO = Path(__file__).resolve().parents[2]


def _to_pixels(labels: np.ndarray, w: float, h: float) -> np.ndarray:
    """YOLO (cls, cx, cy, w, h) -> (cls, x, y, bw, bh) COCO-style top-left pixels."""
    cx, cy, bw, bh = labels[:, 1] * w, labels[:, 2] * h, labels[:, 3] * w, labels[:, 4] * h
    return np.stack((labels[:, 0], cx - bw / 2, cy - bh / 2, bw, bh), 1)


def _coco(tmp_path: Path) -> Path:
    cats = [{"id": 7, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
    images = [{"id": 10, "file_name": "a.jpg", "width": 640, "height": 480},
              {"id": 11, "file_name": "sub/b image.png", "width": 200, "height": 100},
              {"id": 12, "file_name": "empty.jpg", "width": 50, "height": 50}]
    anns = [{"id": 1, "image_id": 10, "category_id": 1, "bbox": [10, 20, 100, 50], "area": 5000, "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 7, "bbox": [600, 400, 40, 80], "area": 3200, "iscrowd": 0},
            {"id": 3, "image_id": 11, "category_id": 3, "bbox": [0, 0, 200, 100], "area": 20000, "iscrowd": 0},
            {"id": 4, "image_id": 11, "category_id": 3, "bbox": [5, 5, 10, 10], "area": 100, "iscrowd": 1},
            {"id": 5, "image_id": 11, "category_id": 1, "bbox": [50, 50, 0, 10], "area": 0, "iscrowd": 0}]
    f = tmp_path / "instances.json"
    f.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return f


def test_coco_round_trip(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        names = coco2yolo(_coco(tmp_path), tmp_path / "labels")
    assert names == ["person", "car", "dog"]  # ascending COCO id 1, 3, 7 -> 0, 1, 2
    assert "annotation id 5" in caplog.text and "empty box" in caplog.text
    a, msgs = parse_label_file(tmp_path / "labels" / "a.txt", nc=3)
    assert msgs == []
    np.testing.assert_allclose(_to_pixels(a, 640, 480), [[0, 10, 20, 100, 50], [2, 600, 400, 40, 80]], atol=1e-3)
    b, _ = parse_label_file(tmp_path / "labels" / "b image.txt", nc=3)
    np.testing.assert_allclose(_to_pixels(b, 200, 100), [[1, 0, 0, 200, 100]], atol=1e-3)  # crowd skipped
    assert (tmp_path / "labels" / "empty.txt").read_text() == ""  # background image keeps a file


def _voc_xml(path: Path, w: int | None, h: int, objs: list[tuple[str, tuple, int]]) -> None:
    size = "" if w is None else f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>"
    body = "".join(f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
                   f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, b, d in objs)
    path.write_text(f"<annotation><filename>{path.stem}.jpg</filename>{size}{body}</annotation>")


def test_voc_round_trip_names_and_bad_objects(tmp_path: Path, caplog) -> None:
    xml = tmp_path / "Annotations"
    xml.mkdir()
    _voc_xml(xml / "img1.xml", 640, 480, [("WBC", (100, 50, 300, 250), 0), ("RBC", (0, 0, 64, 48), 1),
                                          ("RBC", (600, 450, 700, 500), 0)])  # last one runs off the image: clipped
    _voc_xml(xml / "img2.xml", 320, 240, [("Platelets", (10, 10, 10, 30), 0), ("cat", (1, 1, 5, 5), 0)])
    with caplog.at_level(logging.WARNING):
        names = voc2yolo(xml, tmp_path / "labels", names=["RBC", "WBC", "Platelets"])
    assert names == ["RBC", "WBC", "Platelets"]
    assert "class 'cat', not in names" in caplog.text and "('Platelets') has an empty box" in caplog.text
    lab, _ = parse_label_file(tmp_path / "labels" / "img1.txt", nc=3)
    px = _to_pixels(lab, 640, 480)
    np.testing.assert_allclose(px[:, 1:3] + 0, [[100, 50], [0, 0], [600, 450]], atol=1e-3)
    np.testing.assert_allclose(px[:, 3:], [[200, 200], [64, 48], [40, 30]], atol=1e-3)
    assert px[:, 0].tolist() == [1, 0, 0]
    assert (tmp_path / "labels" / "img2.txt").read_text() == ""
    assert voc2yolo(xml, tmp_path / "l2", skip_difficult=True) == ["Platelets", "RBC", "WBC", "cat"]  # found, sorted
    assert len(parse_label_file(tmp_path / "l2" / "img1.txt")[0]) == 2


def test_voc_bad_files(tmp_path: Path) -> None:
    _voc_xml(tmp_path / "nosize.xml", None, 0, [("a", (1, 1, 5, 5), 0)])
    with pytest.raises(ValueError, match="nosize.xml.*<size>"):
        voc2yolo(tmp_path / "nosize.xml", tmp_path / "out")
    (tmp_path / "broken.xml").write_text("<annotation><size>")
    with pytest.raises(ValueError, match="broken.xml"):
        voc2yolo([tmp_path / "broken.xml"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .xml files"):
        voc2yolo(tmp_path / "empty", tmp_path / "out")


def test_cli(tmp_path: Path, capsys) -> None:
    main(["coco", "--json", str(_coco(tmp_path)), "--out", str(tmp_path / "c")])
    assert "nc: 3" in capsys.readouterr().out and (tmp_path / "c" / "a.txt").is_file()
    _voc_xml(tmp_path / "x.xml", 100, 100, [("a", (10, 10, 50, 50), 0)])
    r = subprocess.run([sys.executable, "-m", "utils.data.convert", "voc", "--xml", str(tmp_path / "x.xml"), "--out",
                        str(tmp_path / "v")], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "v" / "x.txt").read_text() == "0 0.300000 0.300000 0.400000 0.400000\n"
