"""YOLO label-file parsing with per-row checks.

A row is `class cx cy w h` (normalised 0..1), or a polygon `class x1 y1 x2 y2 x3 y3 ...` (>= 3 points),
which becomes its bounding box. Bad rows are dropped and reported as `file:line: why`; they never stop
a scan.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

COORD_TOL = 0.01  # coordinates within this much outside 0..1 are clipped (rounding in exporters), beyond: dropped


def _row_to_box(vals: list[float]) -> tuple[list[float] | None, str]:
    """(cx, cy, w, h) clipped to 0..1 from a box or polygon row's coordinates, or (None, reason)."""
    lo, hi = -COORD_TOL, 1 + COORD_TOL
    if len(vals) == 4:
        cx, cy, w, h = vals
        if w <= 0 or h <= 0:
            return None, f"width/height must be > 0, got w={w:g} h={h:g}"
        x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    else:
        xs, ys = vals[0::2], vals[1::2]
        x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
        if x2 <= x1 or y2 <= y1:
            return None, "polygon has zero width or height"
    if min(x1, y1) < lo or max(x2, y2) > hi:
        return None, f"coordinates outside 0..1 (box {x1:.3f},{y1:.3f},{x2:.3f},{y2:.3f})"
    x1, y1, x2, y2 = max(x1, 0.0), max(y1, 0.0), min(x2, 1.0), min(y2, 1.0)
    if x2 <= x1 or y2 <= y1:
        return None, "box is empty after clipping to the image"
    return [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], ""


def parse_row(line: str, nc: int | None) -> tuple[list[float] | None, str]:
    """One label line -> ([cls, cx, cy, w, h], '') or (None, reason). Blank lines give (None, '')."""
    toks = line.split()
    if not toks:
        return None, ""
    n = len(toks)
    if n != 5 and (n < 7 or (n - 1) % 2):
        return None, f"expected 5 columns (class cx cy w h) or a polygon (class + >= 3 x,y pairs), got {n}"
    try:
        vals = [float(t) for t in toks]
    except ValueError:
        bad = next(t for t in toks if not _is_float(t))
        return None, f"non-numeric token '{bad}'"
    if not all(math.isfinite(v) for v in vals):
        return None, "non-finite number (nan/inf)"
    c = vals[0]
    if c < 0 or c != int(c):
        return None, f"class must be a non-negative integer, got {toks[0]}"
    if nc is not None and c >= nc:
        return None, f"class {int(c)} >= nc={nc}"
    box, why = _row_to_box(vals[1:])
    return (None, why) if box is None else ([c] + box, "")


def _is_float(t: str) -> bool:
    try:
        float(t)
        return True
    except ValueError:
        return False


def parse_label_file(path: str | Path, nc: int | None = None) -> tuple[np.ndarray, list[str]]:
    """Read a label file -> (labels float32 [n, 5] (cls, cx, cy, w, h), warnings).

    A missing or empty file gives zero rows (a background image) and no warning. CRLF endings, blank
    lines and trailing spaces are accepted. Duplicate rows are removed with one warning. Each warning
    names the file and 1-based line. An unreadable file raises OSError/UnicodeDecodeError.
    """
    rows, msgs = parse_label_lines(path, nc)
    return rows[:, :5].copy(), msgs


def parse_label_lines(path: str | Path, nc: int | None = None) -> tuple[np.ndarray, list[str]]:
    """As `parse_label_file`, with a 6th column holding each row's 1-based line number."""
    p = Path(path)
    if not p.is_file():
        return np.zeros((0, 6), np.float32), []
    rows, msgs, seen = [], [], set()
    dups = []
    for ln, line in enumerate(p.read_text(encoding="utf-8-sig").splitlines(), 1):
        row, why = parse_row(line, nc)
        if row is None:
            if why:
                msgs.append(f"{p}:{ln}: {why}; row dropped")
            continue
        key = tuple(np.float32(row).tolist())
        if key in seen:
            dups.append(ln)
            continue
        seen.add(key)
        rows.append(row + [ln])
    if dups:
        msgs.append(f"{p}: {len(dups)} duplicate row(s) removed (line {', '.join(map(str, dups[:10]))})")
    return np.array(rows, np.float32).reshape(-1, 6), msgs


def drop_classes_from(rows: np.ndarray, nc: int, label_file: str) -> tuple[np.ndarray, list[str]]:
    """Remove rows [n, 6] (cls, cx, cy, w, h, line) whose class is >= nc -> ([m, 5] kept, warnings)."""
    bad = rows[:, 0] >= nc
    msgs = [f"{label_file}:{int(r[5])}: class {int(r[0])} >= nc={nc}; row dropped" for r in rows[bad]]
    return rows[~bad, :5].copy(), msgs
