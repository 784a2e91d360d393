"""COCO JSON export of validation results and the pycocotools runs behind `val.py --save-json`.

Two id conventions (`coco80` below):
- custom data (default): image `id` = index of the image in the dataset order (0, 1, ...), category `id` =
  our class index (0-based, as in YOLO label files); boxes at full float precision, so that pycocotools
  sees exactly the numbers `utils.eval.metrics` used.
- COCO (`coco80=True`: 80 classes named as COCO's, in COCO's order; see `is_coco_names`): image `id` from
  the numeric file stem (`000000397133.jpg` -> 397133; a non-numeric stem stays the stem string) and
  COCO's category ids 1..90 with gaps (`COCO80_TO_91`), as the official annotation files and the COCO
  server expect; boxes rounded to 3 decimals, scores to 5.
Either way annotation ids start at 1 (COCOeval treats id 0 as "no match") and boxes are `[x, y, w, h]`,
top-left corner and size in original-image pixels.

`score_official` scores a predictions file against an official annotation file (e.g. COCO's
`annotations/instances_val2017.json`); every problem with that file is one printed warning, never a raise.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np

from utils.core.errors import first_line

COCO80_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush")
_UNUSED_IDS = frozenset({12, 26, 29, 30, 45, 66, 68, 69, 71, 83})  # ids of the 2014 paper's 91 never annotated
COCO80_TO_91 = tuple(i for i in range(1, 91) if i not in _UNUSED_IDS)  # class index -> COCO category id
# names of the old Darknet coco.names for the same classes (keys without spaces, lower case)
_ALIASES = {"motorbike": "motorcycle", "aeroplane": "airplane", "sofa": "couch", "tvmonitor": "tv",
            "hairdryer": "hairdrier"}
OFFICIAL_ANNOTATIONS = Path("annotations/instances_val2017.json")  # under the data YAML's `path` (YOLOv5's rule)


def _key(name: object) -> str:
    k = "".join(ch for ch in str(name).lower() if ch.isalnum())
    return _ALIASES.get(k, k)


def is_coco_names(names: list[str] | tuple[str, ...]) -> bool:
    """True for COCO's 80 classes in COCO's order (case, spaces, '_' and '-' ignored; Darknet's old
    spellings such as 'motorbike' or 'tvmonitor' accepted)."""
    return len(names) == 80 and all(_key(n) == _key(c) for n, c in zip(names, COCO80_NAMES))


def coco_image_id(path: str | Path) -> int | str:
    """COCO image id of an image file: its stem as an int when all ASCII digits, else the stem itself."""
    stem = Path(path).stem
    return int(stem) if stem.isascii() and stem.isdigit() else stem


def image_ids(n: int, files: list[str] | None = None, coco80: bool = False) -> list[int | str]:
    """The `image_id` of each of `n` images: their indices, or with `coco80` their file stems' ids."""
    if not coco80:
        return list(range(n))
    if files is None or len(files) != n:
        raise ValueError(f"image_ids: COCO ids need the {n} image file names, got {None if files is None else len(files)}")
    return [coco_image_id(f) for f in files]


def category_ids(nc: int, coco80: bool = False) -> list[int]:
    """The `category_id` of each class index: the index itself, or with `coco80` COCO's 1..90 ids."""
    if not coco80:
        return list(range(nc))
    if nc != 80:
        raise ValueError(f"category_ids: COCO category ids need 80 classes, got {nc}")
    return list(COCO80_TO_91)


def _rows(x, cols: int) -> np.ndarray:
    a = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=np.float64)
    return a.reshape(-1, cols) if a.size else np.zeros((0, cols))


def _xywh(x1: float, y1: float, x2: float, y2: float, decimals: int | None) -> list[float]:
    box = [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]
    return box if decimals is None else [round(v, decimals) for v in box]


def coco_gt_dict(gts: list, shapes: list[tuple[int, int]], names: list[str],
                 files: list[str] | None = None, coco80: bool = False) -> dict:
    """Ground truth `gts[i] [m, 5]` (cls, x1, y1, x2, y2 pixels) of images of `shapes[i] = (h, w)` -> COCO dict.

    Ids follow the module's conventions (`coco80`: ids from `files`' stems and COCO's category ids).
    """
    if len(gts) != len(shapes):
        raise ValueError(f"coco_gt_dict: {len(gts)} label arrays but {len(shapes)} image shapes")
    ids = image_ids(len(gts), files, coco80)
    cats, decimals = (category_ids(len(names), True), 3) if coco80 else (None, None)
    images, anns = [], []
    for i, (g, (h, w)) in enumerate(zip(gts, shapes)):
        images.append({"id": ids[i], "file_name": Path(files[i]).name if files else f"{i}.jpg",
                       "height": int(h), "width": int(w)})
        for c, x1, y1, x2, y2 in _rows(g, 5)[:, :5]:
            box = _xywh(x1, y1, x2, y2, decimals)
            k = int(np.rint(c))
            anns.append({"id": len(anns) + 1, "image_id": ids[i], "category_id": k if cats is None else cats[k],
                         "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
    return {"info": {"description": "MobileYOLO ground truth"}, "images": images, "annotations": anns,
            "categories": [{"id": i if cats is None else cats[i], "name": str(n)} for i, n in enumerate(names)]}


def coco_detections(preds: list, ids: list[int | str] | None = None, cats: list[int] | None = None,
                    decimals: int | None = None) -> list[dict]:
    """Predictions `preds[i] [n, 6]` (x1, y1, x2, y2, conf, cls pixels) -> COCO results list, input order kept.

    `ids[i]`: image id of image i (default i); `cats[c]`: category id of class c (default c); `decimals`:
    rounding of the box (the score gets 2 more), None keeps full precision.
    """
    out = []
    for i, p in enumerate(preds):
        image_id = i if ids is None else ids[i]
        for x1, y1, x2, y2, conf, c in _rows(p, 6)[:, :6]:
            k = int(np.rint(c))
            out.append({"image_id": image_id, "category_id": k if cats is None else cats[k],
                        "bbox": _xywh(x1, y1, x2, y2, decimals),
                        "score": float(conf) if decimals is None else round(float(conf), decimals + 2)})
    return out


def save_coco_json(preds: list, gts: list, shapes: list[tuple[int, int]], names: list[str], save_dir: Path,
                   files: list[str] | None = None, coco80: bool = False) -> tuple[Path, Path]:
    """Write `save_dir/gt_coco.json` and `save_dir/predictions.json`; returns (gt_path, pred_path)."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    gt_path, pred_path = save_dir / "gt_coco.json", save_dir / "predictions.json"
    gt_path.write_text(json.dumps(coco_gt_dict(gts, shapes, names, files, coco80)))
    if coco80:
        dets = coco_detections(preds, image_ids(len(preds), files, True), category_ids(len(names), True), 3)
    else:
        dets = coco_detections(preds)
    pred_path.write_text(json.dumps(dets))
    return gt_path, pred_path


def find_annotations(root: Path, named: Path | None, split: str) -> Path | None:
    """The official annotation file that scores split `split` (only 'val' has one): the data YAML's
    `annotations` file (`named`, whether or not it exists), else `root/annotations/instances_val2017.json`
    when that file exists; None otherwise."""
    if split != "val":
        return None
    if named is not None:
        return Path(named)
    default = Path(root) / OFFICIAL_ANNOTATIONS
    return default if default.is_file() else None


def _evaluate(gt, pred_json: str | Path, verbose: bool, img_ids: list | None) -> np.ndarray:
    """COCOeval 'bbox' of `pred_json` against the loaded `gt` (restricted to `img_ids`) -> its 12 stats."""
    from pycocotools.cocoeval import COCOeval

    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with sink:
        ev = COCOeval(gt, gt.loadRes(str(pred_json)), "bbox")
        if img_ids is not None:
            ev.params.imgIds = sorted(set(img_ids))
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats, dtype=float)


def run_cocoeval(gt_json: str | Path, pred_json: str | Path, verbose: bool = True,
                 img_ids: list | None = None) -> np.ndarray:
    """pycocotools COCOeval (bbox) on two JSON files -> its 12 `stats` (stats[0] mAP@.5:.95, stats[1] mAP@.5).

    `img_ids`: score only these images (default: all of `gt_json`). Prints pycocotools' summary when
    `verbose`. An empty prediction file gives zeros (pycocotools itself cannot load an empty result list).
    pycocotools' own errors (AssertionError, KeyError, TypeError ...) propagate.
    """
    from pycocotools.coco import COCO

    if not json.loads(Path(pred_json).read_text()):
        if verbose:
            print(f"pycocotools: {pred_json} holds no detections; all AP/AR are 0")
        return np.zeros(12)
    with contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_json))
    return _evaluate(gt, pred_json, verbose, img_ids)


def _load_official(anno_json: Path):
    """pycocotools COCO index of `anno_json`, or a one-line reason (str) why it cannot be used."""
    from pycocotools.coco import COCO

    if not anno_json.is_file():
        return "file not found"
    try:
        data = json.loads(anno_json.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"not valid JSON ({first_line(e)})"
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations")):
        return "not a COCO annotation file (expected a JSON object with 'images' and 'annotations' lists)"
    seen, dup = set(), None
    for a in data["annotations"]:
        key = a.get("id") if isinstance(a, dict) else None
        if key is not None and key in seen:
            dup = key
            break
        seen.add(key)
    if dup is not None:  # COCOeval marks matches by annotation id: repeated ids silently corrupt the scores
        return f"annotation ids repeat (e.g. {dup!r})"
    gt = COCO()
    gt.dataset = data
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            gt.createIndex()
    except (KeyError, TypeError) as e:
        return f"not a COCO annotation file (an entry lacks {first_line(e)})"
    return gt


def score_official(pred_json: str | Path, anno_json: str | Path, img_ids: list, verbose: bool = True) -> np.ndarray | None:
    """pycocotools' 12 stats of `pred_json` against the official `anno_json`, scored on `img_ids` only
    (the images of the validated split, which may be a subset of the file's); None after one printed
    `WARNING: <anno_json>: ...` line when the file is missing, not COCO JSON, lacks some of `img_ids`, or
    pycocotools fails on it. Predictions whose category ids the file lacks are warned about and scored."""
    anno_json = Path(anno_json)
    skip = "; not scored against it"
    gt = _load_official(anno_json)
    if isinstance(gt, str):
        print(f"WARNING: annotation file {anno_json}: {gt}{skip}")
        return None
    missing = [i for i in img_ids if i not in gt.imgs]
    if missing:
        print(f"WARNING: annotation file {anno_json}: {len(missing)} of the {len(img_ids)} image ids of this "
              f"split are not in it (e.g. {missing[0]!r}){skip}")
        return None
    dets = json.loads(Path(pred_json).read_text())
    unknown = sorted({d["category_id"] for d in dets} - set(gt.cats))
    if unknown:
        print(f"WARNING: annotation file {anno_json}: has no categories {unknown[:10]} used in {pred_json}")
    if not dets:
        print(f"pycocotools: {pred_json} holds no detections; all AP/AR are 0")
        return np.zeros(12)
    try:
        return _evaluate(gt, pred_json, verbose, img_ids)
    except Exception as e:  # noqa: BLE001 - pycocotools asserts/raises on malformed entries; report, don't crash
        print(f"WARNING: annotation file {anno_json}: pycocotools failed ({type(e).__name__}: {first_line(e)}){skip}")
        return None
