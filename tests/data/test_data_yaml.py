"""Data YAML parsing, image lists and the hyper-parameter file."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from utils.data.data_yaml import (DataConfigError, check_dataset, img2label_path, list_image_files, load_hyp)
from utils.data.synthetic import make_synthetic_dataset

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn"), n_train=4, n_val=2, imgsz=64, nc=2)


def _write(tmp_path: Path, cfg: dict) -> Path:
    f = tmp_path / "d.yaml"
    f.write_text(yaml.safe_dump(cfg))
    return f


def test_check_dataset_synthetic(synth: Path) -> None:
    cfg = check_dataset(synth)
    assert cfg.names == ["class0", "class1"] and cfg.nc == 2 and cfg.test is None
    assert cfg.train == [synth.parent / "images" / "train"] and cfg.yaml_file == synth.resolve()
    assert len(list_image_files(cfg.train)) == 4 and len(list_image_files(cfg.val)) == 2


def test_relative_path_list_of_folders_and_names_list(tmp_path: Path) -> None:
    make_synthetic_dataset(tmp_path / "ds", n_train=2, n_val=1, imgsz=32)
    f = tmp_path / "sub" / "d.yaml"
    f.parent.mkdir()
    f.write_text(yaml.safe_dump({"path": "../ds", "train": ["images/train", "images/val"], "val": "images/val",
                                 "names": ["a", "b"]}))
    cfg = check_dataset(f)
    assert cfg.path == (tmp_path / "ds").resolve() and len(cfg.train) == 2
    assert len(list_image_files(cfg.train)) == 3


def test_bundled_bccd_by_name() -> None:
    cfg = check_dataset("bccd")
    assert cfg.names == ["RBC", "WBC", "Platelets"] and cfg.path == REPO / "data" / "bccd"
    assert len(list_image_files(cfg.train)) == 292 and len(list_image_files(cfg.val)) == 72


@pytest.mark.parametrize("drop", ["train", "val", "names"])
def test_missing_key(synth: Path, tmp_path: Path, drop: str) -> None:
    cfg = {"path": str(synth.parent), "train": "images/train", "val": "images/val", "names": ["a", "b"]}
    del cfg[drop]
    with pytest.raises(DataConfigError, match=f"'{drop}'"):
        check_dataset(_write(tmp_path, cfg))


@pytest.mark.parametrize("cfg, match", [
    ({"train": "images/nope", "val": "images/val", "names": ["a", "b"]}, "'train' path does not exist.*nope"),
    ({"train": "images/train", "val": "images/train", "names": ["a", "b"], "nc": 3}, "nc=3.*2 entries"),
    ({"train": "images/train", "val": "images/val", "names": {0: "a", 2: "b"}}, "without gaps"),
    ({"train": "images/train", "val": "images/val", "names": "ab"}, "'names' must be"),
    ({"train": "images/train", "val": "images/val", "names": ["a"], "test": "missing_dir"}, "'test' path"),
])
def test_bad_yaml_values(synth: Path, tmp_path: Path, cfg: dict, match: str) -> None:
    with pytest.raises(DataConfigError, match=match):
        check_dataset(_write(tmp_path, {"path": str(synth.parent), **cfg}))


def test_bad_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(DataConfigError, match="not found"):
        check_dataset(tmp_path / "absent.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(DataConfigError, match="not valid YAML"):
        check_dataset(tmp_path / "bad.yaml")
    (tmp_path / "path.yaml").write_text("path: nowhere\ntrain: a\nval: a\nnames: [x]\n")
    with pytest.raises(DataConfigError, match="'path' folder does not exist"):
        check_dataset(tmp_path / "path.yaml")


def test_txt_list_missing_files(synth: Path, tmp_path: Path, caplog) -> None:
    imgs = list_image_files([synth.parent / "images" / "train"])
    lst = tmp_path / "train.txt"
    lst.write_text(f"{imgs[0]}\n\n./missing_one.jpg\n{imgs[1]}\r\n")
    cfg = check_dataset(_write(tmp_path, {"train": str(lst), "val": str(lst), "names": ["a", "b"]}))
    with caplog.at_level(logging.WARNING):
        files = list_image_files(cfg.train)
    assert files == sorted(imgs[:2]) and "missing_one.jpg" in caplog.text and "1 listed images" in caplog.text
    lst.write_text("gone1.jpg\ngone2.jpg\n")
    with pytest.raises(DataConfigError, match="none of the 2 listed images exist"):
        list_image_files([lst])


def test_img2label_path() -> None:
    assert img2label_path("/d/images/train/a b.JPG") == "/d/labels/train/a b.txt"
    assert img2label_path("/images/x/images/train/é.png") == "/images/x/labels/train/é.txt"  # last 'images' only
    assert img2label_path("/flat/a.jpg") == "/flat/a.txt"


def test_default_hyp_keys_and_comments() -> None:
    hyp = load_hyp()
    for k in ("hsv_h", "hsv_s", "hsv_v", "degrees", "translate", "scale", "shear", "perspective", "flipud",
              "fliplr", "mosaic", "mixup"):
        assert isinstance(hyp[k], (int, float)), k
    for line in (REPO / "data" / "hyps" / "default.yaml").read_text().splitlines():
        if line and not line.startswith("#"):
            assert "#" in line, f"hyp key without a comment: {line}"
    with pytest.raises(DataConfigError, match="not found"):
        load_hyp("/nonexistent/hyp.yaml")
