"""Data YAML parsing (`check_dataset`), image-list resolution and the hyper-parameter file.

A data YAML is written as YOLOv5/Ultralytics users write it::

    path: ../datasets/coco128   # absolute, or relative to the YAML's folder (default: that folder)
    train: images/train2017     # folder, list of folders, or .txt list of image paths (relative to `path`)
    val: images/val2017
    test:                       # optional
    nc: 80                      # optional, checked against names
    names: [person, bicycle]    # list, or {0: person, 1: bicycle}
    coco: true                  # optional: val.py's JSON uses COCO ids (default: when names are COCO's 80)
    annotations: annotations/instances_val2017.json  # optional: official COCO JSON of `val` (relative to path)
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from utils.core.errors import UserError, yaml_error
from utils.core.paths import ROOT

LOGGER = logging.getLogger("mobileyolo.data")
IMG_FORMATS = ("jpg", "jpeg", "png", "bmp", "tif", "tiff", "webp")
REPO_DATA = ROOT / "data"  # where bundled YAMLs (bccd.yaml, hyps/) live


class DataConfigError(UserError, ValueError):
    """A data YAML or image list is unusable; the message names the key or file."""


@dataclass
class DataConfig:
    """Resolved data YAML. `train`/`val`/`test` hold existing folders or .txt lists (absolute paths)."""
    path: Path
    train: list[Path]
    val: list[Path]
    test: list[Path] | None
    names: list[str]
    nc: int
    yaml_file: Path
    coco: bool | None = None  # `coco: true/false`: COCO ids in val.py's JSON (None: decided from the names)
    annotations: Path | None = None  # `annotations: file` (relative to path): official COCO JSON of `val`


def _find_yaml(data: str | Path) -> Path:
    """The YAML file for `data`; bare names such as 'bccd' or 'bccd.yaml' also look in the repo's data/."""
    p = Path(data)
    if p.is_file():
        return p.resolve()
    for cand in (REPO_DATA / p.name, REPO_DATA / f"{p.name}.yaml"):
        if not p.parent.parts and cand.is_file():
            return cand
    raise DataConfigError(f"data YAML '{data}' not found")


def _parse_names(raw: Any, yaml_file: Path) -> list[str]:
    if isinstance(raw, dict):
        try:
            keys = sorted(int(k) for k in raw)
        except (TypeError, ValueError) as e:
            raise DataConfigError(f"{yaml_file}: 'names' keys must be integer class ids ({e})") from None
        if keys != list(range(len(keys))):
            raise DataConfigError(f"{yaml_file}: 'names' ids must be 0..{len(keys) - 1} without gaps, got {keys}")
        by_id = {int(k): v for k, v in raw.items()}
        return [str(by_id[i]) for i in keys]
    if isinstance(raw, (list, tuple)):
        return [str(n) for n in raw]
    raise DataConfigError(f"{yaml_file}: 'names' must be a list or an {{id: name}} mapping, got {type(raw).__name__}")


def _same_int(value: Any, n: int) -> bool:
    try:
        return int(value) == n
    except (TypeError, ValueError):  # `nc: many` is reported as a mismatch, naming the value
        return False


def expand_path(value: str, key: str, yaml_file: Path) -> Path:
    """`~` and `$VAR` / `${VAR}` expanded; a variable that is not set is a `DataConfigError` naming it."""
    text = os.path.expandvars(os.path.expanduser(value.strip()))
    unset = re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", text)
    if unset:
        raise DataConfigError(f"{yaml_file}: '{key}' uses environment variable ${unset[0]}, which is not set "
                              f"({value.strip()})")
    return Path(text)


def _resolve_split(raw: Any, key: str, root: Path, yaml_file: Path) -> list[Path]:
    entries = raw if isinstance(raw, (list, tuple)) else [raw]
    out = []
    for e in entries:
        if not isinstance(e, (str, Path)) or not str(e).strip():
            raise DataConfigError(f"{yaml_file}: '{key}' must be a folder, list of folders or .txt file, got {e!r}")
        p = expand_path(str(e), key, yaml_file)
        p = p if p.is_absolute() else root / p
        if not p.exists():
            raise DataConfigError(f"{yaml_file}: '{key}' path does not exist: {p}")
        if p.is_file() and p.suffix.lower() != ".txt":
            raise DataConfigError(f"{yaml_file}: '{key}' must be a folder or a .txt image list, got file {p}")
        out.append(p.resolve())
    return out


def check_dataset(data: str | Path | dict) -> DataConfig:
    """Read and validate a data YAML (path, or an already-loaded dict whose relative paths use the cwd).

    Raises `DataConfigError` naming the missing key, the missing folder/file, or the nc/names mismatch.
    """
    if isinstance(data, dict):
        cfg, yaml_file = dict(data), Path.cwd() / "<dict>"
    else:
        yaml_file = _find_yaml(data)
        try:
            cfg = yaml.safe_load(yaml_file.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise DataConfigError(yaml_error(yaml_file, e)) from None
    if not isinstance(cfg, dict):
        raise DataConfigError(f"{yaml_file}: expected a mapping with train/val/names keys")
    for key in ("train", "val", "names"):
        if cfg.get(key) in (None, "", []):
            raise DataConfigError(f"{yaml_file}: missing required key '{key}'")
    names = _parse_names(cfg["names"], yaml_file)
    if not names:
        raise DataConfigError(f"{yaml_file}: 'names' is empty")
    if cfg.get("nc") is not None and not _same_int(cfg["nc"], len(names)):
        raise DataConfigError(f"{yaml_file}: nc={cfg['nc']} but 'names' has {len(names)} entries")
    if not isinstance(cfg.get("path") or ".", (str, Path)):
        raise DataConfigError(f"{yaml_file}: 'path' must be a folder name, got {cfg['path']!r}")
    root = expand_path(str(cfg.get("path") or "."), "path", yaml_file)
    root = (root if root.is_absolute() else yaml_file.parent / root).resolve()
    if not root.is_dir():
        raise DataConfigError(f"{yaml_file}: 'path' folder does not exist: {root}")
    test, coco, anno = cfg.get("test"), cfg.get("coco"), cfg.get("annotations")
    if coco is not None and not isinstance(coco, bool):
        raise DataConfigError(f"{yaml_file}: 'coco' must be true or false, got {coco!r}")
    if anno is not None and (not isinstance(anno, str) or not anno.strip()):
        raise DataConfigError(f"{yaml_file}: 'annotations' must be the path of a COCO JSON file, got {anno!r}")
    return DataConfig(path=root, train=_resolve_split(cfg["train"], "train", root, yaml_file),
                      val=_resolve_split(cfg["val"], "val", root, yaml_file),
                      test=_resolve_split(test, "test", root, yaml_file) if test else None,
                      names=names, nc=len(names), yaml_file=yaml_file, coco=coco,
                      annotations=root / expand_path(anno, "annotations", yaml_file) if anno else None)


def _read_list(txt: Path) -> list[Path]:
    """Image paths from a .txt list; relative lines are tried against the list's folder, then its parent."""
    files, missing = [], []
    for line in txt.read_text(encoding="utf-8").splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        p = Path(s).expanduser()
        if not p.is_absolute():
            cands = [txt.parent / p, txt.parent.parent / p]
            p = next((c for c in cands if c.exists()), cands[0])
        (files if p.is_file() else missing).append(p)
    if missing:
        shown = ", ".join(str(m) for m in missing[:5]) + (" ..." if len(missing) > 5 else "")
        if not files:
            raise DataConfigError(f"{txt}: none of the {len(missing)} listed images exist (e.g. {shown})")
        LOGGER.warning("%s: %d listed images do not exist and are skipped: %s", txt, len(missing), shown)
    return files


def list_image_files(sources: list[Path] | Path | str) -> list[str]:
    """Sorted, de-duplicated image paths (str) under folders (recursive) and in .txt lists.

    Only the extensions in IMG_FORMATS (any case) are kept. Raises DataConfigError for a missing source.
    """
    srcs = sources if isinstance(sources, (list, tuple)) else [sources]
    files: list[Path] = []
    for s in map(Path, srcs):
        if s.is_dir():
            files += [p for p in s.rglob("*") if p.is_file()]
        elif s.is_file() and s.suffix.lower() == ".txt":
            files += _read_list(s)
        elif s.is_file():
            files.append(s)
        else:
            raise DataConfigError(f"image source does not exist: {s}")
    # absolute but not symlink-resolved: labels are looked up beside the path the user gave
    keep = {os.path.abspath(p) for p in files if p.suffix[1:].lower() in IMG_FORMATS}
    return sorted(keep)


def img2label_path(im_file: str) -> str:
    """The label path of an image: last '/images/' in the path -> '/labels/', extension -> '.txt'."""
    p = Path(im_file)
    parts = list(p.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return str(Path(*parts).with_suffix(".txt"))


def load_hyp(path: str | Path | None = None) -> dict:
    """Hyper-parameters as a dict of floats; default `data/hyps/default.yaml`. Unknown keys are kept."""
    p = Path(path) if path else REPO_DATA / "hyps" / "default.yaml"
    if not p.is_file():
        raise DataConfigError(f"hyper-parameter file not found: {p}")
    try:
        hyp = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DataConfigError(yaml_error(p, e)) from None
    if not isinstance(hyp, dict):
        raise DataConfigError(f"{p}: expected a mapping of hyper-parameters")
    return hyp
