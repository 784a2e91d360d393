"""Inference sources for detect.py: images, folders, globs, `.txt` lists, video files, webcams, streams.

`LoadSource(source, vid_stride)` iterates `Frame`s one at a time (nothing is kept between frames, so
memory stays flat over long videos). Images are decoded with OpenCV (EXIF orientation applied); an
unreadable image is skipped with a warning naming it, unless it is the whole source; a video that stops
before its reported frame count keeps the frames read so far and names where it broke. `skipped_note()`
counts both for the run's summary. A video that cannot be opened, a camera index with no camera, a stream
that does not answer within `stream_timeout()` seconds, a folder with no images or videos, a missing
path, a `.txt` list that names nothing usable, or a single image that cannot be read raise `SourceError`.
"""
from __future__ import annotations

import glob
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from utils.core.errors import UserError
from utils.data.data_yaml import IMG_FORMATS
from utils.data.images import ImageReadError, read_image, verify_image

LOGGER = logging.getLogger("mobileyolo.sources")
VID_FORMATS = ("mp4", "avi", "mkv", "mov", "m4v", "mpeg", "mpg", "wmv", "webm", "ts", "gif", "asf")
STREAM_PREFIXES = ("rtsp://", "rtmp://", "http://", "https://", "udp://", "tcp://")
DEFAULT_FPS = 30.0  # used when a stream or a file does not report its frame rate
TIMEOUT_ENV = "MOBILEYOLO_STREAM_TIMEOUT"  # seconds a stream may take to open or to deliver a frame
DEFAULT_TIMEOUT_S = 10.0


def stream_timeout() -> float:
    """Seconds a stream URL may take to open or to send the next frame: `$MOBILEYOLO_STREAM_TIMEOUT`, else 10."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw.strip() else DEFAULT_TIMEOUT_S
    except ValueError:
        raise SourceError(f"{TIMEOUT_ENV}={raw!r}: expected seconds (a number > 0)") from None
    if not math.isfinite(value) or value <= 0:
        raise SourceError(f"{TIMEOUT_ENV}={raw!r}: expected seconds (a number > 0)")
    return value


class SourceError(UserError, ValueError):
    """A `--source` that cannot be read at all: missing path, empty folder, unopenable video."""


@dataclass
class Frame:
    """One image to run detection on.

    `image` is BGR uint8 [h, w, 3]. `path` is the file (or the stream URL / webcam index as text).
    `kind` is 'image', 'video' or 'stream'. For videos and streams `index` is the frame number in the
    source (0-based, counting skipped frames too), `fps` the source frame rate and `frames` the frame
    count of the file (0 when unknown, e.g. streams). For images `index` is 0 and `fps` 0.
    """

    path: str
    image: np.ndarray
    kind: str
    index: int = 0
    fps: float = 0.0
    frames: int = 0

    @property
    def stem(self) -> str:
        """File stem, or a filesystem-safe name for a stream/webcam (used for output file names)."""
        if self.kind == "stream":
            return stream_name(self.path)
        return Path(self.path).stem


def stream_name(url: str) -> str:
    """`rtsp://host:554/live` -> `rtsp_host_554_live`; webcam `0` -> `webcam0`."""
    if url.isdigit():
        return f"webcam{url}"
    safe = "".join(c if c.isalnum() else "_" for c in url)
    return "_".join(p for p in safe.split("_") if p)[:80] or "stream"


def _suffix(p: str | Path) -> str:
    return Path(p).suffix[1:].lower()


def is_stream(source: str) -> bool:
    """True for a webcam index (`0`) or a URL OpenCV reads as a stream."""
    return source.isdigit() or source.lower().startswith(STREAM_PREFIXES)


def _media_files(paths: list[Path]) -> list[Path]:
    """Images and videos among `paths`, each real file once (symlinks to one file count once)."""
    seen, out = set(), []
    for p in paths:
        if p.is_file() and _suffix(p) in IMG_FORMATS + VID_FORMATS:
            real = os.path.realpath(p)
            if real not in seen:
                seen.add(real)
                out.append(p)
    return out


def _glob(pattern: str) -> list[Path]:
    """`glob` with `**` walking each real folder once: a symlink loop (`a/up -> ..`) neither repeats files
    nor recurses without end. Patterns with `**` elsewhere than one folder step fall back to `glob`."""
    head, sep, tail = pattern.partition("**")
    tail = tail.lstrip("/" + os.sep)
    if not sep or glob.has_magic(head) or "**" in tail:
        return [Path(f) for f in sorted(glob.glob(pattern, recursive=True))]
    top, seen, loops, out = head.rstrip("/" + os.sep) or ".", set(), [], []
    for root, dirs, _ in os.walk(top, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            loops.append(root)
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        out += sorted(glob.glob(os.path.join(glob.escape(root), tail or "*")))
    if loops:
        LOGGER.warning(f"{top}: {len(loops)} folder(s) reached again through symlinks (a loop?), e.g. {loops[0]}; "
                       f"each folder is searched once")
    return [Path(f) for f in out]


def _read_list(txt: Path) -> list[Path]:
    """Paths listed one per line in `txt` (blank lines and `#` comments ignored).

    Relative paths are tried against the working directory, then the list's own folder. A missing
    entry is skipped with a warning naming `txt` and the line.
    """
    files = []
    for n, line in enumerate(txt.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        p = Path(entry)
        if not p.is_absolute() and not p.exists():
            p = txt.parent / p
        if not p.is_file():
            LOGGER.warning(f"{txt}:{n}: '{entry}' not found; skipped")
        elif _suffix(p) not in IMG_FORMATS + VID_FORMATS:
            LOGGER.warning(f"{txt}:{n}: '{entry}' is not an image or video ({', '.join(IMG_FORMATS)}, "
                           f"{', '.join(VID_FORMATS)}); skipped")
        else:
            files.append(p)
    return files


def resolve_source(source: str | Path) -> list[str]:
    """Expand `source` into a list of image/video paths, or `[source]` for a stream/webcam.

    Raises `SourceError` naming the source when nothing usable is found.
    """
    s = str(source).strip()
    if not s:
        raise SourceError("--source is empty")
    if is_stream(s):
        return [s]
    p = Path(s).expanduser()
    if any(c in s for c in "*?["):
        files = _media_files(_glob(s))
        what = f"glob '{s}'"
    elif p.is_dir():
        files = _media_files(sorted(p.iterdir()))
        what = f"folder {p}"
    elif p.is_file() and _suffix(p) == "txt":
        files = _read_list(p)
        what = f"list {p}"
    elif p.is_file():
        if _suffix(p) not in IMG_FORMATS + VID_FORMATS:
            raise SourceError(f"{p}: unsupported file type '.{_suffix(p)}'; expected an image "
                              f"({', '.join(IMG_FORMATS)}), a video ({', '.join(VID_FORMATS)}) or a .txt list")
        return [str(p)]
    else:
        raise SourceError(f"{s}: source not found (expected an image, folder, glob, .txt list, video, "
                          f"webcam index or stream URL)")
    if not files:
        raise SourceError(f"{what}: no images or videos found (images: {', '.join(IMG_FORMATS)}; "
                          f"videos: {', '.join(VID_FORMATS)})")
    return [str(f) for f in files]


def _open_capture(path: str, timeout_s: float | None = None) -> cv2.VideoCapture:
    """An opened capture; `SourceError` naming the file, camera or stream (a stream gets `timeout_s` to answer)."""
    if path.isdigit():
        cap = cv2.VideoCapture(int(path))
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"camera {path}: no such camera, or it is in use (OpenCV could not open it; "
                              f"on Linux check /dev/video{path})")
        return cap
    t0 = time.monotonic()
    if is_stream(path):
        ms = int((timeout_s or stream_timeout()) * 1000)
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms]
        cap = cv2.VideoCapture(path, cv2.CAP_FFMPEG, params)
    else:
        cap = cv2.VideoCapture(path)
    if not cap.isOpened():
        cap.release()
        if is_stream(path):
            took = time.monotonic() - t0
            how = (f"stream unreachable, no answer within {took:.0f} s (the limit; set {TIMEOUT_ENV} to change it)"
                   if took >= 0.9 * (timeout_s or stream_timeout()) else "connection refused or not a video stream")
            raise SourceError(f"{path}: could not open video/stream: {how}")
        raise SourceError(f"{path}: could not open video/stream with OpenCV (missing codec, bad file or "
                          f"unreachable stream)")
    return cap


class LoadSource:
    """Iterate the frames of `source` (see `resolve_source`), keeping every `vid_stride`-th video frame.

    `len()` is the number of frames expected (images + kept video frames; streams count 0 since they
    are unbounded) and is meant for progress bars; it can over-count when frames fail to decode.
    """

    def __init__(self, source: str | Path, vid_stride: int = 1, timeout_s: float | None = None) -> None:
        if int(vid_stride) < 1:
            raise SourceError(f"--vid-stride must be >= 1, got {vid_stride}")
        self.vid_stride = int(vid_stride)
        self.timeout_s = timeout_s  # streams: seconds to open / per frame (None: stream_timeout())
        self.skipped = {"image": 0, "frame": 0, "video": 0}  # skipped images/frames, videos cut short
        self.items = resolve_source(source)
        self.kinds = ["stream" if is_stream(s) else "video" if _suffix(s) in VID_FORMATS else "image"
                      for s in self.items]
        self._counts = [self._expected(s, k) for s, k in zip(self.items, self.kinds)]
        if self.kinds == ["image"]:  # the whole source is one image: unreadable is an error, not a warning
            size, why = verify_image(self.items[0])
            if size is None:
                raise SourceError(why.removesuffix("; image skipped"))

    def _expected(self, item: str, kind: str) -> int:
        if kind == "image":
            return 1
        cap = _open_capture(item, self.timeout_s)  # fail early, before any output is written
        n = 0 if kind == "stream" else int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        cap.release()
        return math.ceil(max(n, 0) / self.vid_stride)

    def __len__(self) -> int:
        return sum(self._counts)

    def skipped_note(self) -> str:
        """`'2 images skipped, 1 video cut short: see above'` so far, or '' when nothing was."""
        parts = [f"{n} {what}{'s' if n != 1 else ''} {'cut short' if what == 'video' else 'skipped'}"
                 for what, n in self.skipped.items() if n]
        return f"{', '.join(parts)}: see above" if parts else ""

    def __iter__(self) -> Iterator[Frame]:
        for item, kind in zip(self.items, self.kinds):
            if kind == "image":
                try:
                    yield Frame(item, read_image(item), "image")
                except ImageReadError as e:
                    if len(self.items) == 1:
                        raise  # nothing else to run on: one line at the command line, not an empty run
                    self.skipped["image"] += 1
                    LOGGER.warning(f"{e}; skipped")
            else:
                yield from self._video_frames(item, kind)

    def _video_frames(self, path: str, kind: str) -> Iterator[Frame]:
        cap = _open_capture(path, self.timeout_s)
        try:
            fps = cap.get(cv2.CAP_PROP_FPS)
            fps = float(fps) if fps and math.isfinite(fps) and 0 < fps < 1000 else DEFAULT_FPS
            total = 0 if kind == "stream" else int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
            index = 0
            while True:
                # grab() skips decoding for frames dropped by vid_stride
                if not cap.grab():
                    break
                if index % self.vid_stride == 0:
                    ok, img = cap.retrieve()
                    if ok and img is not None:
                        yield Frame(path, img, kind, index, fps, total)
                    else:
                        self.skipped["frame"] += 1
                        LOGGER.warning(f"{path}: frame {index} could not be decoded; skipped")
                index += 1
            if index == 0:
                raise SourceError(f"{path}: opened but no frame could be read (empty or corrupt video)")
            if kind == "stream":  # closed by the sender, or nothing arrived within the timeout
                LOGGER.warning(f"{path}: stream ended after {index} frames")
            elif total - index > max(1, total // 100):  # FRAME_COUNT is an estimate in some containers
                self.skipped["video"] += 1
                LOGGER.warning(f"{path}: video breaks off after frame {index - 1} of {total} (truncated or "
                               f"corrupt file); the {index} frames read are kept")
        finally:
            cap.release()
