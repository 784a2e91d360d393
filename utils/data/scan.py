"""Scan a split: check every image and label file in parallel, cache the result next to the labels.

Cache: `<labels dir>.cache` (e.g. `labels/train.cache`), JSON (safe to load, no pickle), written to a
temp file and `os.replace`d. It is keyed by a hash of every image and label path, size and mtime and
`CACHE_VERSION`; a stale, corrupt or unreadable cache is ignored and rebuilt. The class-count check is
applied after loading, so callers with different `nc` share one cache.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from utils.data.data_yaml import img2label_path
from utils.data.images import verify_image
from utils.data.labels import drop_classes_from, parse_label_lines

LOGGER = logging.getLogger("mobileyolo.data")
CACHE_VERSION = 2  # bump when the cached entry layout changes: old caches are then rebuilt


@dataclass
class ScanResult:
    """Usable images with their labels [n, 5] (cls, cx, cy, w, h normalised) and displayed sizes (w, h)."""
    im_files: list[str]
    labels: list[np.ndarray]
    shapes: np.ndarray  # [n, 2] int (w, h)
    n_background: int = 0
    n_corrupt: int = 0  # images skipped (unreadable, too small, too large, unreadable label file)
    n_rows_dropped: int = 0  # label rows dropped (each named in msgs)
    msgs: list[str] = field(default_factory=list)
    from_cache: bool = False


def cache_path_for(im_files: list[str]) -> Path:
    """`labels/train.cache` for images under `images/train` (the first image's label folder + .cache)."""
    return Path(img2label_path(im_files[0])).parent.with_suffix(".cache")


def files_hash(im_files: list[str]) -> str:
    """Hash of paths, sizes and mtimes of every image and label file (missing labels count too)."""
    h = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    for f in im_files:
        for p in (f, img2label_path(f)):
            try:
                st = os.stat(p)
                h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode(errors="surrogateescape"))  # non-UTF-8 names
            except OSError:
                h.update(f"{p}|-\n".encode(errors="surrogateescape"))
    return h.hexdigest()


def _check_one(im_file: str) -> tuple[str, tuple[int, int] | None, list, list[str]]:
    """(image, (w, h) or None when unusable, label rows [n, 6] with line numbers, warnings)."""
    shape, msg = verify_image(im_file)
    msgs = [msg] if msg else []
    if shape is None:
        return im_file, None, [], msgs
    lb_file = img2label_path(im_file)
    try:
        labels, lmsgs = parse_label_lines(lb_file)
    except (OSError, UnicodeDecodeError) as e:
        return im_file, None, [], msgs + [f"{lb_file}: label file unreadable ({e}); image skipped"]
    return im_file, shape, labels.tolist(), msgs + lmsgs


def _load_cache(path: Path, key: str) -> dict | None:
    """The cache at `path` when it is current; None (with a warning naming why, unless it is absent)."""
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        LOGGER.warning("%s: scan cache unreadable (%s); rebuilding", path, e)
        return None
    if not isinstance(cache, dict) or not isinstance(cache.get("entries"), list):
        why = "not a scan cache (no entries)"
    elif cache.get("version") != CACHE_VERSION:
        why = f"written by another version ({cache.get('version')!r}, this is {CACHE_VERSION})"
    elif cache.get("hash") != key:
        why = "stale (images or labels changed since it was written)"
    else:
        return cache
    LOGGER.warning("%s: scan cache %s; rebuilding", path, why)
    return None


def orphan_labels(folders: list[Path], im_files: list[str]) -> list[str]:
    """Warnings for label files that match no image: one per image folder in `folders` whose `labels`
    twin (`images/train` -> `labels/train`) holds `.txt` files no file in `im_files` maps to."""
    have = {img2label_path(f) for f in im_files}
    msgs = []
    for folder in folders:
        folder = Path(os.path.abspath(folder))
        lab_dir = Path(img2label_path(str(folder / "_.jpg"))).parent
        if not folder.is_dir() or lab_dir == folder or not lab_dir.is_dir():
            continue  # a .txt list, or labels beside the images (other .txt files may live there)
        orphans = sorted(p.name for p in lab_dir.rglob("*.txt") if str(p) not in have)
        if orphans:
            shown = ", ".join(orphans[:5]) + (" ..." if len(orphans) > 5 else "")
            msgs.append(f"{lab_dir}: {len(orphans)} label file(s) match no image in {folder} ({shown}); ignored")
    return msgs


def skip_note(res: ScanResult) -> str:
    """`'3 images skipped, 2 label rows dropped: see above'` for a scan, or '' when nothing was."""
    parts = [f"{n} {what}{'s' if n != 1 else ''} {verb}" for n, what, verb in
             ((res.n_corrupt, "image", "skipped"), (res.n_rows_dropped, "label row", "dropped")) if n]
    return f"{', '.join(parts)}: see above" if parts else ""


def _save_cache(path: Path, cache: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(cache), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:  # read-only dataset folders are common; the scan result is still valid
        LOGGER.warning("%s: cannot write scan cache (%s)", path, e)
        tmp.unlink(missing_ok=True)


def scan_images(im_files: list[str], nc: int | None = None, prefix: str = "", use_cache: bool = True,
                workers: int = 8, folders: list[Path] | None = None) -> ScanResult:
    """Check images and labels (or load the cache); print `N images, M backgrounds, K corrupt, W warnings`
    and, when anything was skipped, `K images skipped, R label rows dropped: see above`.

    Each problem is logged once as a warning naming the file (and line). Corrupt images are dropped.
    `folders`: the image folders the files came from, checked for label files that match no image.
    """
    if not im_files:
        return ScanResult([], [], np.zeros((0, 2), int))
    cpath = cache_path_for(im_files)
    key = files_hash(im_files)
    cache = _load_cache(cpath, key) if use_cache else None
    from_cache = cache is not None
    if cache is None:
        entries = []
        with ThreadPoolExecutor(max(1, min(workers, os.cpu_count() or 1, len(im_files)))) as ex:
            it = ex.map(_check_one, im_files)
            for im_file, shape, labels, msgs in tqdm(it, total=len(im_files), desc=f"{prefix}scanning {cpath.with_suffix('')}",
                                                     leave=False, disable=len(im_files) < 64):
                entries.append([im_file, shape, labels, msgs])
        cache = {"version": CACHE_VERSION, "hash": key, "entries": entries}
        if use_cache and cpath.parent.is_dir():  # no labels folder (background-only split): nothing to cache beside
            _save_cache(cpath, cache)
    res = ScanResult([], [], np.zeros((0, 2), int), from_cache=from_cache)
    shapes = []
    for im_file, shape, labels, msgs in cache["entries"]:
        res.msgs += msgs
        if shape is None:
            res.n_corrupt += 1
            continue
        lab = np.array(labels, np.float32).reshape(-1, 6)
        if nc is not None:
            lab, nc_msgs = drop_classes_from(lab, nc, img2label_path(im_file))
            res.msgs += nc_msgs
        lab = lab[:, :5]
        res.im_files.append(im_file)
        res.labels.append(lab)
        shapes.append(shape)
        res.n_background += len(lab) == 0
    res.shapes = np.array(shapes, int).reshape(-1, 2)
    res.n_rows_dropped = sum(m.endswith("; row dropped") for m in res.msgs)
    res.msgs += orphan_labels(folders or [], im_files)
    for m in res.msgs:
        LOGGER.warning("%s%s", prefix, m)
    src = f"cache {cpath}" if from_cache else f"scanned {cpath.with_suffix('')}"
    print(f"{prefix}{src}: {len(res.im_files)} images, {res.n_background} backgrounds, "
          f"{res.n_corrupt} corrupt, {len(res.msgs)} warnings" + (f"; {skip_note(res)}" if skip_note(res) else ""))
    return res
