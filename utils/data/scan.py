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
    n_corrupt: int = 0
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
                h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{p}|-\n".encode())
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
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
        if cache.get("version") == CACHE_VERSION and cache.get("hash") == key and isinstance(cache.get("entries"), list):
            return cache
    except FileNotFoundError:
        return None
    except (OSError, ValueError, UnicodeDecodeError, AttributeError) as e:
        LOGGER.warning("%s: scan cache unreadable (%s); rebuilding", path, e)
    return None


def _save_cache(path: Path, cache: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(cache), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:  # read-only dataset folders are common; the scan result is still valid
        LOGGER.warning("%s: cannot write scan cache (%s)", path, e)
        tmp.unlink(missing_ok=True)


def scan_images(im_files: list[str], nc: int | None = None, prefix: str = "", use_cache: bool = True,
                workers: int = 8) -> ScanResult:
    """Check images and labels (or load the cache); print `N images, M backgrounds, K corrupt`.

    Each problem is logged once as a warning naming the file (and line). Corrupt images are dropped.
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
    for m in res.msgs:
        LOGGER.warning("%s%s", prefix, m)
    src = f"cache {cpath}" if from_cache else f"scanned {cpath.with_suffix('')}"
    print(f"{prefix}{src}: {len(res.im_files)} images, {res.n_background} backgrounds, "
          f"{res.n_corrupt} corrupt, {len(res.msgs)} warnings")
    return res
