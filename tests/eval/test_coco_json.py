"""COCO-exact JSON (`utils.eval.coco`) and val.py on a tiny COCO-layout dataset with an official-style
`annotations/instances_val2017.json` written by the test (real COCO ids: 1 person, 3 car, 18 dog, 90
toothbrush), scored by pycocotools itself."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

import val
from tests.backend_helpers import make_checkpoint
from tests.eval.test_val import Oracle
from utils.core.errors import cli_main
from utils.data import DataConfigError, check_dataset, create_dataloader
from utils.eval.coco import (
    COCO80_NAMES,
    COCO80_TO_91,
    category_ids,
    coco_image_id,
    find_annotations,
    is_coco_names,
    save_coco_json,
    score_official,
)
from utils.eval.evaluator import _coco_json, evaluate
from utils.eval.metrics import Metrics

# file stem -> ((w, h), [(our class index, COCO category id, x, y, w, h pixels)]); ids typed out, not derived
IMAGES = {
    "000000000139": ((96, 64), [(0, 1, 10, 8, 30, 40), (2, 3, 50, 20, 40, 30)]),
    "000000000285": ((64, 96), [(16, 18, 5, 10, 50, 60)]),
    "000000397133": ((80, 80), [(79, 90, 20, 20, 16, 24), (0, 1, 40, 30, 30, 40)]),
}
EXTRA_ID = 581929  # an image of the annotation file outside the split: must not count as missed
CATEGORIES = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"},
              {"id": 90, "name": "toothbrush"}]
# COCO's category ids of its 80 classes, typed out from instances_val2017.json (not computed)
COCO_IDS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31,
            32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58,
            59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90]


def write_coco_set(root: Path, annotations: str | None = None, extra: dict | None = None) -> Path:
    """Images with 12-digit stems, YOLO labels, a data YAML with COCO's 80 names, the official-style JSON."""
    (root / "images/val2017").mkdir(parents=True, exist_ok=True)
    (root / "labels/val2017").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    images, anns = [{"id": EXTRA_ID, "file_name": f"{EXTRA_ID:012d}.jpg", "width": 64, "height": 64}], []
    anns.append({"id": 1, "image_id": EXTRA_ID, "category_id": 1, "bbox": [1, 1, 20, 20], "area": 400, "iscrowd": 0})
    for stem, ((w, h), boxes) in IMAGES.items():
        img = np.full((h, w, 3), 100, np.uint8)
        for k, (_, _, x, y, bw, bh) in enumerate(boxes):
            cv2.rectangle(img, (x, y), (x + bw - 1, y + bh - 1), (40 * k, 200, 60), -1)
        cv2.imwrite(str(root / f"images/val2017/{stem}.jpg"), img)
        rows = [f"{c} {(x + bw / 2) / w:.8f} {(y + bh / 2) / h:.8f} {bw / w:.8f} {bh / h:.8f}"
                for c, _, x, y, bw, bh in boxes]
        (root / f"labels/val2017/{stem}.txt").write_text("\n".join(rows) + "\n")
        images.append({"id": int(stem), "file_name": f"{stem}.jpg", "width": w, "height": h})
        anns += [{"id": len(anns) + 1 + k, "image_id": int(stem), "category_id": cat, "bbox": [x, y, bw, bh],
                  "area": bw * bh, "iscrowd": 0} for k, (_, cat, x, y, bw, bh) in enumerate(boxes)]
    cats = [{"id": i, "name": n, "supercategory": "x"} for i, n in zip(COCO_IDS, COCO80_NAMES)]
    official = {"info": {}, "images": images, "annotations": anns, "categories": cats}
    (root / "annotations/instances_val2017.json").write_text(json.dumps(official))
    cfg = {"path": str(root), "train": "images/val2017", "val": "images/val2017", "names": list(COCO80_NAMES)}
    if annotations is not None:
        cfg["annotations"] = annotations
    cfg.update(extra or {})
    (root / "coco.yaml").write_text(yaml.safe_dump(cfg))
    return root / "coco.yaml"


@pytest.fixture(scope="module")
def coco_yaml(tmp_path_factory):
    return write_coco_set(tmp_path_factory.mktemp("coco"))


def official(root: Path) -> dict:
    return json.loads((root / "annotations/instances_val2017.json").read_text())


def truth_pairs(root: Path) -> dict:
    """image id -> sorted (category id, rounded xywh) pairs of the official file."""
    out: dict = {}
    for a in official(root)["annotations"]:
        out.setdefault(a["image_id"], []).append((a["category_id"], [round(v, 1) for v in a["bbox"]]))
    return {k: sorted(v) for k, v in out.items()}


def test_ids_and_names():
    assert coco_image_id("x/val2017/000000397133.jpg") == 397133 and coco_image_id("000000000000.png") == 0
    assert coco_image_id("a/frame_12.jpg") == "frame_12" and coco_image_id("\u0661\u0662.jpg") == "\u0661\u0662"
    assert list(COCO80_TO_91) == COCO_IDS and len(COCO_IDS) == 80
    assert (COCO80_TO_91[0], COCO80_TO_91[2], COCO80_TO_91[16], COCO80_TO_91[79]) == (1, 3, 18, 90)
    assert (COCO80_NAMES[0], COCO80_NAMES[2], COCO80_NAMES[16], COCO80_NAMES[79]) == ("person", "car", "dog", "toothbrush")
    darknet = [{"motorcycle": "motorbike", "airplane": "aeroplane", "couch": "sofa", "tv": "tvmonitor",
                "dining table": "diningtable"}.get(n, n.upper()) for n in COCO80_NAMES]
    assert is_coco_names(COCO80_NAMES) and is_coco_names(darknet)
    swapped = list(COCO80_NAMES)
    swapped[1], swapped[2] = swapped[2], swapped[1]
    assert not is_coco_names(swapped) and not is_coco_names(COCO80_NAMES[:79]) and not is_coco_names(["a", "b"])
    assert category_ids(3) == [0, 1, 2]
    with pytest.raises(ValueError, match="80 classes"):
        category_ids(3, coco80=True)


def test_json_from_ground_truth_scores_one_against_the_official_file(coco_yaml, tmp_path, capsys):
    """Predictions equal to the ground truth, written with COCO ids: pycocotools gives exactly 1.0."""
    root = coco_yaml.parent
    files = [str(root / f"images/val2017/{s}.jpg") for s in IMAGES]
    gts = [np.array([[c, x, y, x + bw, y + bh] for c, _, x, y, bw, bh in b], float) for _, b in IMAGES.values()]
    preds = [np.array([[x, y, x2, y2, 0.9, c] for c, x, y, x2, y2 in g]) for g in gts]
    shapes = [(h, w) for (w, h), _ in IMAGES.values()]
    gt_json, pred_json = save_coco_json(preds, gts, shapes, list(COCO80_NAMES), tmp_path, files, coco80=True)
    dets = json.loads(pred_json.read_text())
    by_image: dict = {}
    for d in dets:
        by_image.setdefault(d["image_id"], []).append((d["category_id"], d["bbox"]))
        assert d["score"] == 0.9 and isinstance(d["image_id"], int)
    truth = truth_pairs(root)
    assert {k: sorted(v) for k, v in by_image.items()} == {k: v for k, v in truth.items() if k != EXTRA_ID}
    ours = json.loads(gt_json.read_text())
    assert sorted(i["id"] for i in ours["images"]) == [139, 285, 397133]
    assert {c["id"]: c["name"] for c in ours["categories"]}[90] == "toothbrush"
    stats = score_official(pred_json, root / "annotations/instances_val2017.json", [139, 285, 397133], verbose=False)
    assert stats[0] == pytest.approx(1.0) and stats[1] == pytest.approx(1.0)
    # the extra image of the file is outside the split: scoring the whole file would miss its person
    assert score_official(pred_json, root / "annotations/instances_val2017.json",
                          [139, 285, 397133, EXTRA_ID], verbose=False)[0] < 1.0
    assert "WARNING" not in capsys.readouterr().out
    # a file that lacks a predicted category: one warning naming it, and still scored (that class gets no AP)
    anno = json.loads((root / "annotations/instances_val2017.json").read_text())
    anno["categories"] = [c for c in anno["categories"] if c["id"] != 90]
    (tmp_path / "no90.json").write_text(json.dumps(anno))
    assert score_official(pred_json, tmp_path / "no90.json", [139, 285, 397133], verbose=False)[0] == pytest.approx(1.0)
    assert "has no categories [90] used in" in capsys.readouterr().out


@pytest.mark.parametrize("content, expect", [
    (None, "file not found"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "not a COCO annotation file"),
    (json.dumps({"images": [{"id": 139}], "annotations": [{"id": 1, "bbox": [0, 0, 1, 1]}]}), "lacks"),
    (json.dumps({"images": [{"id": 7}], "annotations": [], "categories": CATEGORIES}), "2 of the 2 image ids"),
    (json.dumps({"images": [{"id": 139}, {"id": 285}], "categories": CATEGORIES, "annotations": [
        {"id": 4, "image_id": 139, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0},
        {"id": 4, "image_id": 285, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0}]}),
     "annotation ids repeat (e.g. 4)"),
    (json.dumps({"images": [{"id": 139}, {"id": 285}], "categories": CATEGORIES, "annotations": [
        {"id": 1, "image_id": 139, "category_id": 1, "area": 25, "iscrowd": 0}]}), "pycocotools failed (KeyError"),
], ids=["missing", "not-json", "list", "no-image-id", "other-images", "repeated-ids", "no-bbox"])
def test_bad_annotation_file_warns_in_one_line(tmp_path, capsys, content, expect):
    pred = tmp_path / "predictions.json"
    pred.write_text(json.dumps([{"image_id": 139, "category_id": 1, "bbox": [1, 1, 5, 5], "score": 0.5}]))
    anno = tmp_path / "instances_val2017.json"
    if content is not None:
        anno.write_text(content)
    assert score_official(pred, anno, [139, 285], verbose=False) is None
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"WARNING: annotation file {anno}") and expect in lines[0]


def test_evaluate_writes_coco_ids_and_reports_pycocotools(coco_yaml, tmp_path, capsys):
    cfg = check_dataset(coco_yaml)
    loader, _ = create_dataloader(cfg.val, 96, batch_size=2, stride=32, rect=True, workers=0, pad=0.5)
    anno = find_annotations(cfg.path, cfg.annotations, "val")
    assert anno == cfg.path / "annotations/instances_val2017.json" and find_annotations(cfg.path, None, "test") is None
    m = evaluate(Oracle(loader, 80), loader, cfg.names, save_dir=tmp_path, save_json=True, coco80=True, anno_json=anno)
    out = capsys.readouterr().out
    assert m.coco_stats[0] == pytest.approx(1.0) and m.map == pytest.approx(1.0) and m.map50 == pytest.approx(1.0)
    assert "pycocotools" in out and "instances_val2017.json" in out and "WARNING" not in out
    dets = json.loads((tmp_path / "predictions.json").read_text())
    got: dict = {}
    for d in dets:
        got.setdefault(d["image_id"], []).append((d["category_id"], [round(v, 1) for v in d["bbox"]]))
    truth = truth_pairs(cfg.path)
    assert {k: sorted(v) for k, v in got.items()} == {k: v for k, v in truth.items() if k != EXTRA_ID}

    # a broken official file: one warning naming it, our figures printed, labels' gt_coco.json scored instead
    bad = tmp_path / "broken.json"
    bad.write_text("{")
    m2 = evaluate(Oracle(loader, 80), loader, cfg.names, save_dir=tmp_path / "b", save_json=True, coco80=True,
                  anno_json=bad)
    out = capsys.readouterr().out
    assert out.count("WARNING") == 1 and f"annotation file {bad}: not valid JSON" in out and "Traceback" not in out
    assert "gt_coco.json" in out and m2.coco_stats[0] == pytest.approx(1.0, abs=1e-3)


def run_val(data: Path, weights: Path, project: Path, *extra: str):
    return val.main(["--data", str(data), "--weights", str(weights), "--imgsz", "64", "--batch-size", "2",
                     "--workers", "0", "--project", str(project), "--noplots", *extra])


@pytest.fixture(scope="module")
def coco_weights(tmp_path_factory):
    # obj_logit: an untrained model that still gives confident boxes, so predictions.json is not empty
    return make_checkpoint(tmp_path_factory.mktemp("w") / "coco80.pt", nc=80, names=list(COCO80_NAMES), obj_logit=2.0)


def test_val_save_json_on_coco_layout(coco_yaml, coco_weights, tmp_path, capsys):
    m = run_val(coco_yaml, coco_weights, tmp_path, "--save-json", "--name", "coco")
    out = capsys.readouterr().out
    dets = json.loads((tmp_path / "coco/predictions.json").read_text())
    ids = {im["id"] for im in official(coco_yaml.parent)["images"]}
    assert dets and {d["image_id"] for d in dets} <= ids - {EXTRA_ID}
    assert {d["category_id"] for d in dets} <= set(range(1, 91)) - {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
    assert all(d["bbox"] == [round(v, 3) for v in d["bbox"]] for d in dets)
    row = next(ln for ln in out.splitlines() if ln.strip().startswith("pycocotools"))
    assert "instances_val2017.json" in row and "WARNING" not in out
    assert m.map == pytest.approx(m.coco_stats[0]) and m.map50 == pytest.approx(m.coco_stats[1])


def test_val_annotations_key_and_bad_keys(tmp_path, coco_weights, capsys):
    data = write_coco_set(tmp_path / "d", annotations="ann/missing.json")
    m = run_val(data, coco_weights, tmp_path / "runs", "--save-json")
    out = capsys.readouterr().out
    warn = [ln for ln in out.splitlines() if "WARNING" in ln]
    assert len(warn) == 1 and str(tmp_path / "d/ann/missing.json") in warn[0] and "file not found" in warn[0]
    assert "mAP50-95" in out and m.coco_stats is not None  # our table, then pycocotools on gt_coco.json
    for extra, msg in (({"coco": "yes"}, "'coco' must be true or false"), ({"annotations": 5}, "'annotations' must")):
        with pytest.raises(DataConfigError, match=msg):
            check_dataset(write_coco_set(tmp_path / "e", extra=extra))
    # `coco: false` keeps today's ids on COCO names; `coco: true` needs 80 classes
    data = write_coco_set(tmp_path / "f", extra={"coco": False})
    run_val(data, coco_weights, tmp_path / "runs", "--save-json", "--name", "plain")
    dets = json.loads((tmp_path / "runs/plain/predictions.json").read_text())
    assert {d["image_id"] for d in dets} <= {0, 1, 2} and "image ids" in capsys.readouterr().out
    data = write_coco_set(tmp_path / "g", extra={"coco": True, "names": ["a", "b"]})
    assert cli_main("val.py", val.main, ["--data", str(data), "--weights", str(coco_weights), "--save-json",
                                         "--workers", "0", "--project", str(tmp_path / "runs")]) == 2
    assert "'coco: true' needs COCO's 80 classes" in capsys.readouterr().err


def test_stems_that_pycocotools_cannot_take_warn_instead_of_raising(tmp_path, capsys):
    """Mixed numeric and non-numeric stems (pycocotools cannot sort int and str ids) and a repeated stem."""
    box = [np.array([[0, 1, 1, 10, 10]], float)] * 3
    preds = [np.array([[1, 1, 10, 10, 0.9, 0]])] * 3
    files = ["a/000000000139.jpg", "b/000000000139.jpg", "a/frame.jpg"]
    m = Metrics(map50=0.25, map=0.125)
    _coco_json(m, preds, box, [(20, 20)] * 3, files, list(COCO80_NAMES), tmp_path, True, None)
    out = capsys.readouterr().out
    assert "WARNING: COCO image ids repeat: 1 images have the file stem of an earlier one (e.g. 139)" in out and "WARNING: pycocotools failed on" in out
    assert m.coco_stats is None and (m.map50, m.map) == (0.25, 0.125)
    assert [d["image_id"] for d in json.loads((tmp_path / "predictions.json").read_text())] == [139, 139, "frame"]
