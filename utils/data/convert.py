"""Convert COCO JSON and Pascal VOC XML annotations to YOLO label files.

    python -m utils.data.convert coco --json instances_val.json --out datasets/x/labels/val
    python -m utils.data.convert voc --xml VOC/Annotations --out datasets/x/labels/train [--names cat dog]

One `.txt` per image (named after the image file's stem; an image without boxes gets an empty file, i.e. a
background), rows `class cx cy w h` normalised to 0..1. Boxes are clipped to the image; empty ones are
skipped with a warning naming the annotation. The class list is printed as a `names:` block for the data YAML.
"""
from __future__ import annotations

import argparse
import logging
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from collections.abc import Sequence

from tqdm import tqdm

from utils.core.errors import FlagError, MissingFileError, cli_main, first_line
from utils.data.data_yaml import DataConfigError

LOGGER = logging.getLogger("mobileyolo.data")


def _yolo_row(cls: int, x1: float, y1: float, x2: float, y2: float, w: float, h: float) -> str | None:
    """Clip a pixel xyxy box to a w x h image -> 'cls cx cy bw bh' normalised, or None when empty."""
    x1, x2 = min(max(x1, 0.0), w), min(max(x2, 0.0), w)
    y1, y2 = min(max(y1, 0.0), h), min(max(y2, 0.0), h)
    if x2 <= x1 or y2 <= y1:
        return None
    return f"{cls} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}"


def coco2yolo(json_file: str | Path, out_dir: str | Path, skip_crowd: bool = True) -> list[str]:
    """Write YOLO labels for every image of a COCO detection JSON; returns class names in YOLO id order.

    COCO category ids (often sparse, e.g. 1..90) are mapped to 0..n-1 in ascending id order.
    Crowd annotations are skipped by default (they mark regions, not instances).
    """
    from pycocotools.coco import COCO  # reads and indexes the JSON (same reader as the metrics)

    if not Path(json_file).is_file():
        raise MissingFileError(f"{json_file}: COCO JSON not found")
    try:
        coco = COCO(str(json_file))
    except (ValueError, KeyError, TypeError, AssertionError) as e:  # bad JSON, or JSON of another shape
        raise DataConfigError(f"{json_file}: not a COCO detection JSON ({first_line(e)})") from None
    cat_ids = sorted(coco.getCatIds())
    to_yolo = {cid: i for i, cid in enumerate(cat_ids)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for img_id in tqdm(sorted(coco.getImgIds()), desc="coco -> yolo", disable=len(coco.imgs) < 100):
        info = coco.imgs[img_id]
        w, h = float(info["width"]), float(info["height"])
        rows = []
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=img_id, iscrowd=None)):
            if skip_crowd and ann.get("iscrowd", 0):
                continue
            x, y, bw, bh = ann["bbox"]
            row = _yolo_row(to_yolo[ann["category_id"]], x, y, x + bw, y + bh, w, h)
            if row is None:
                LOGGER.warning("%s: annotation id %s of image %s has an empty box %s; skipped",
                               json_file, ann.get("id"), info["file_name"], ann["bbox"])
                continue
            rows.append(row)
        (out / f"{Path(info['file_name']).stem}.txt").write_text("".join(r + "\n" for r in rows))
    return [coco.cats[c]["name"] for c in cat_ids]


def _voc_objects(xml_file: Path) -> tuple[float, float, str, list[tuple[str, list[float], bool]]]:
    """(width, height, image file name, [(class name, [xmin, ymin, xmax, ymax], difficult)]) of one VOC XML."""
    try:
        root = ET.parse(xml_file).getroot()
        size = root.find("size")
        w, h = float(size.findtext("width")), float(size.findtext("height"))
    except (ET.ParseError, AttributeError, TypeError, ValueError) as e:
        raise DataConfigError(f"{xml_file}: not a Pascal VOC annotation with <size><width>/<height> ({e})") from None
    objs = []
    for k, obj in enumerate(root.iter("object")):
        try:
            bb = obj.find("bndbox")
            box = [float(bb.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax")]
        except (AttributeError, TypeError, ValueError):
            raise DataConfigError(f"{xml_file}: object {k} has no valid <bndbox>") from None
        objs.append(((obj.findtext("name") or "").strip(), box, obj.findtext("difficult") == "1"))
    return w, h, root.findtext("filename") or f"{xml_file.stem}.jpg", objs


def voc2yolo(xml: str | Path | Sequence[str | Path], out_dir: str | Path, names: Sequence[str] | None = None,
             skip_difficult: bool = False) -> list[str]:
    """Write YOLO labels for VOC XML files (a folder of them or a list); returns the class names used.

    Without `names`, classes are every name found, sorted alphabetically. With `names`, an object of
    another class is skipped with a warning. VOC pixel corners are used as they are (no 1-based shift).
    """
    files = sorted(Path(xml).glob("*.xml")) if isinstance(xml, (str, Path)) and Path(xml).is_dir() else \
        [Path(x) for x in ([xml] if isinstance(xml, (str, Path)) else xml)]
    if not files:
        raise DataConfigError(f"{xml}: no .xml files found")
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise MissingFileError(f"{missing[0]}: VOC annotation not found")
    parsed = [(f, _voc_objects(f)) for f in files]
    if names is None:
        names = sorted({o[0] for _, (_, _, _, objs) in parsed for o in objs})
    index = {n: i for i, n in enumerate(names)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f, (w, h, fname, objs) in tqdm(parsed, desc="voc -> yolo", disable=len(parsed) < 100):
        rows = []
        for k, (name, (x1, y1, x2, y2), difficult) in enumerate(objs):
            if difficult and skip_difficult:
                continue
            if name not in index:
                LOGGER.warning("%s: object %d has class '%s', not in names; skipped", f, k, name)
                continue
            row = _yolo_row(index[name], x1, y1, x2, y2, w, h)
            if row is None:
                LOGGER.warning("%s: object %d ('%s') has an empty box; skipped", f, k, name)
                continue
            rows.append(row)
        (out / f"{Path(fname).stem}.txt").write_text("".join(r + "\n" for r in rows))
    return list(names)


def run(fmt: str, src: str | Path, out: str | Path, names: Sequence[str] | None = None,
        skip_difficult: bool = False, keep_crowd: bool = False) -> list[str]:
    """Convert `src` (COCO JSON, or VOC XML folder/file) into YOLO labels under `out`; print the names block."""
    if fmt == "coco":
        result = coco2yolo(src, out, skip_crowd=not keep_crowd)
    elif fmt == "voc":
        result = voc2yolo(src, out, names=names, skip_difficult=skip_difficult)
    else:
        raise FlagError(f"unknown format '{fmt}' (use coco or voc)")
    print(f"Wrote YOLO labels to {out}. For the data YAML:\nnc: {len(result)}\nnames:")
    for i, n in enumerate(result):
        print(f"  {i}: {n}")
    return result


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="COCO JSON / Pascal VOC XML -> YOLO label files")
    sub = ap.add_subparsers(dest="fmt", required=True)
    c = sub.add_parser("coco", help="COCO detection JSON")
    c.add_argument("--json", required=True, help="instances_*.json")
    c.add_argument("--out", required=True, help="labels folder to write (e.g. .../labels/val)")
    c.add_argument("--keep-crowd", action="store_true", help="also convert iscrowd=1 annotations")
    v = sub.add_parser("voc", help="Pascal VOC XML")
    v.add_argument("--xml", required=True, help="folder of .xml files, or one .xml file")
    v.add_argument("--out", required=True, help="labels folder to write")
    v.add_argument("--names", nargs="+", default=None, help="class names in id order (default: all found, sorted)")
    v.add_argument("--skip-difficult", action="store_true", help="drop objects marked difficult")
    a = ap.parse_args(argv)
    if a.fmt == "coco":
        run("coco", a.json, a.out, keep_crowd=a.keep_crowd)
    else:
        run("voc", a.xml, a.out, names=a.names, skip_difficult=a.skip_difficult)


if __name__ == "__main__":
    sys.exit(cli_main("convert.py", main))
