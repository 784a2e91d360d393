"""Image checking (header only, for the scan) and decoding (OpenCV) into 3-channel 8-bit BGR.

Convention (YOLO's): labels refer to the *displayed* image, i.e. after the EXIF orientation is applied.
OpenCV's decoders apply EXIF orientation themselves, and the scan reports the transposed size, so
image, size and labels agree. Grayscale, palette, RGBA (alpha dropped) and 16-bit images all come out
of `IMREAD_COLOR` as 3-channel uint8.
"""
from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from utils.core.errors import UserError

MIN_SIDE = 10  # pixels; smaller images carry no usable object and are skipped
MIN_DECODED = 0.5  # a truncated JPEG is kept only when at least this share of its rows decodes
# Largest image decoded (w * h; about 537 MB as 8-bit BGR): PIL's own decompression-bomb limit. Larger
# images (e.g. 20000 x 20000) are refused from their header, before any pixel is decoded.
MAX_PIXELS = 178_956_970
_ORIENT_TRANSPOSED = {5, 6, 7, 8}  # EXIF orientations that swap width and height
_REDUCED = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))


class ImageReadError(UserError, OSError):
    """An image that passed the scan could not be decoded later (changed on disk, or unsupported)."""


def _exif_orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # a malformed EXIF block must not make the image unusable; treat as upright
        return 1


class _TooLarge(Exception):
    """An image over MAX_PIXELS (message names the file and the size)."""


def _too_large(p: Path, size: str, pixels: int) -> str:
    return (f"{p}: image is {size}{pixels / 1e6:.0f} MP, over the {MAX_PIXELS / 1e6:.0f} MP limit; "
            f"not decoded (downscale it first)")


def _header(p: Path) -> tuple[int, int, str, int]:
    """(w, h as stored, PIL format, EXIF orientation) from the header; `_TooLarge` for a huge image."""
    try:
        with Image.open(p) as im:
            w, h = im.size
            fmt, orient = (im.format or "").upper(), _exif_orientation(im)
    except Image.DecompressionBombError as e:  # PIL refuses from the header, before reading pixels
        m = re.search(r"\((\d+) pixels\)", str(e))
        raise _TooLarge(_too_large(p, "", int(m.group(1)) if m else MAX_PIXELS + 1)) from None
    if w * h > MAX_PIXELS:
        raise _TooLarge(_too_large(p, f"{w}x{h} = ", w * h))
    return w, h, fmt, orient


def verify_image(path: str | Path) -> tuple[tuple[int, int] | None, str]:
    """Check one image -> ((w, h) as displayed, warning) when usable, or (None, reason) when not.

    Reads the header (PIL), not the pixels, except for a JPEG that lacks its end marker: that one is
    decoded and kept only when its pixels are not blank (OpenCV reads truncated JPEGs tolerantly).
    Images over `MAX_PIXELS` are refused from their header.
    """
    p = Path(path)
    try:
        if p.stat().st_size == 0:
            return None, f"{p}: zero-byte file; image skipped"
        w, h, fmt, orient = _header(p)
    except _TooLarge as e:
        return None, f"{e}; image skipped"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        return None, f"{p}: not a readable image ({type(e).__name__}: {e}); image skipped"
    if orient in _ORIENT_TRANSPOSED:
        w, h = h, w
    if min(w, h) < MIN_SIDE:
        return None, f"{p}: image is {w}x{h}, under {MIN_SIDE} px; image skipped"
    if fmt in ("JPEG", "MPO"):
        with open(p, "rb") as f:
            f.seek(-2, 2)
            complete = f.read() == b"\xff\xd9"
        if not complete:
            img = _decode(p, cv2.IMREAD_COLOR)
            frac = 0.0 if img is None else _decoded_fraction(img)
            if frac < MIN_DECODED:
                return None, (f"{p}: truncated JPEG, only {frac:.0%} of its rows decode (rest is blank fill); "
                              "image skipped")
            return (w, h), f"{p}: truncated JPEG (no end marker); {frac:.0%} of rows decode, read tolerantly"
    return (w, h), ""


def _decoded_fraction(img: np.ndarray) -> float:
    """Share of rows above the uniform fill that libjpeg writes where a truncated JPEG's data ends."""
    rows = img.reshape(img.shape[0], -1)
    filled = (rows == rows[:, :1]).all(1)
    blank_tail = int(np.argmin(filled[::-1])) if not filled.all() else len(filled)
    return 1.0 - blank_tail / len(filled)


def _decode(path: str | Path, flag: int) -> np.ndarray | None:
    # imdecode on the raw bytes works for any path (spaces, non-ASCII) on every platform
    try:
        buf = np.fromfile(str(path), dtype=np.uint8)
    except OSError:
        return None
    if buf.size > 4 and buf[0] == 0xFF and buf[1] == 0xD8 and not (buf[-2] == 0xFF and buf[-1] == 0xD9):
        # a truncated JPEG: OpenCV's imdecode rejects it, but with its end marker restored libjpeg
        # decodes what is there and fills the rest with grey
        buf = np.concatenate((buf, np.array([0xFF, 0xD9], np.uint8)))
    return cv2.imdecode(buf, flag) if buf.size else None


def read_image(path: str | Path, max_side: int | None = None, size_hint: tuple[int, int] | None = None) -> np.ndarray:
    """Decode an image -> BGR uint8 [h, w, 3], EXIF orientation applied.

    With `max_side` and the displayed size `size_hint` (w, h), JPEGs at least 2x larger than needed are
    decoded at 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling, much faster); the caller still resizes to
    the exact size. Raises ImageReadError naming the file when it cannot be decoded. Without
    `size_hint` (an image the scan has not checked) the header is read first, and an image over
    `MAX_PIXELS` is refused before any pixel is decoded.
    """
    if size_hint is None:
        try:
            _header(Path(path))
        except _TooLarge as e:
            raise ImageReadError(str(e)) from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            pass  # PIL cannot read it; OpenCV may (or reports it below)
    flag = cv2.IMREAD_COLOR
    if max_side and size_hint and Path(path).suffix.lower() in (".jpg", ".jpeg"):
        long_side = max(size_hint)
        flag = next((f for k, f in _REDUCED if long_side / k >= max_side), cv2.IMREAD_COLOR)
    img = _decode(path, flag)
    if img is None:
        raise ImageReadError(f"{path}: image could not be decoded")
    return img


def resize_long_side(img: np.ndarray, target: int, interp_down: int = cv2.INTER_AREA) -> np.ndarray:
    """Resize so that the long side equals `target` px (aspect kept); no-op when it already does."""
    h, w = img.shape[:2]
    r = target / max(h, w)
    if r == 1:
        return img
    interp = cv2.INTER_LINEAR if r > 1 else interp_down
    return cv2.resize(img, (max(1, round(w * r)), max(1, round(h * r))), interpolation=interp)
