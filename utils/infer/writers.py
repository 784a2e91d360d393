"""What detect.py writes for each frame: annotated images/videos, YOLO label files, crops, a live window.

`ResultWriter(save_dir, ...)` gets one call per frame (`write(frame, det, names)`) and keeps at most one
open `cv2.VideoWriter` (the current video's), so memory does not grow with the input length. Call
`close()` at the end (or use it as a context manager) to finish the last video file.

Layout under `save_dir`: `<name>.<ext>` annotated images, `<stem>.mp4` annotated videos (mp4v, the
source's size; fps = source fps / vid_stride so the video lasts as long as the source),
`labels/<stem>.txt` (video frames: `labels/<stem>_<frame>.txt`) with rows `cls cx cy w h [conf]`
normalised to the original image, `crops/<class name>/<stem>[_<frame>]_<k>.jpg`.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import cv2
import numpy as np

from utils.ops.boxes import xyxy2xywhn
from utils.core.draw import draw_boxes
from utils.infer.sources import Frame

LOGGER = logging.getLogger("mobileyolo.detect")


def label_lines(det: np.ndarray, shape: tuple[int, int], save_conf: bool = False) -> list[str]:
    """Detections `[n, 6]` (x1, y1, x2, y2 px, conf, cls) in an image of shape (h, w) -> YOLO label rows
    `cls cx cy w h` normalised 0..1 (boxes clipped to the image), plus `conf` with `save_conf`."""
    if not len(det):
        return []
    xywhn = xyxy2xywhn(det[:, :4].astype(np.float64), w=shape[1], h=shape[0], clip=True)
    rows = []
    for (cx, cy, w, h), conf, cls in zip(xywhn, det[:, 4], det[:, 5]):
        row = f"{int(cls)} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}"
        rows.append(row + f" {conf:.6f}" if save_conf else row)
    return rows


def crop_box(img: np.ndarray, box: np.ndarray | list[float]) -> np.ndarray | None:
    """A contiguous copy of the pixels of xyxy `box` in `img` (rounded outwards, clipped to the image);
    None when nothing of the box lies inside the image."""
    h, w = img.shape[:2]
    x1, y1 = max(int(box[0]), 0), max(int(box[1]), 0)
    x2, y2 = min(int(np.ceil(box[2])), w), min(int(np.ceil(box[3])), h)
    if x2 <= x1 or y2 <= y1:
        return None
    return np.ascontiguousarray(img[y1:y2, x1:x2])


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "_"


def _imwrite(path: Path, img: np.ndarray) -> None:
    # imencode + tofile handles any path (spaces, non-ASCII), unlike cv2.imwrite on some platforms
    ok, buf = cv2.imencode(path.suffix or ".jpg", img)
    if not ok:
        raise OSError(f"{path}: OpenCV could not encode the image")
    buf.tofile(str(path))


def _can_show() -> bool:
    """False (with one warning) when no window can be opened: no display on Linux, or headless OpenCV."""
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        # GUI OpenCV builds abort the whole process when there is no display, so do not even try
        LOGGER.warning("--view-img: no display (DISPLAY/WAYLAND_DISPLAY unset); not showing results")
        return False
    return True


class ResultWriter:
    """Per-frame outputs of detect.py (see the module docstring). Counts what it wrote."""

    def __init__(self, save_dir: Path, save_img: bool = True, save_txt: bool = False, save_conf: bool = False,
                 save_crop: bool = False, view_img: bool = False, line_thickness: int = 2,
                 hide_labels: bool = False, hide_conf: bool = False, vid_stride: int = 1) -> None:
        self.save_dir = Path(save_dir)
        self.save_img, self.save_txt, self.save_conf, self.save_crop = save_img, save_txt, save_conf, save_crop
        self.view_img, self.vid_stride = view_img and _can_show(), max(int(vid_stride), 1)
        self.draw_args = {"line_thickness": line_thickness, "hide_labels": hide_labels, "hide_conf": hide_conf}
        self._video_key: str | None = None
        self._video: cv2.VideoWriter | None = None
        self.counts = {"images": 0, "videos": 0, "labels": 0, "crops": 0}
        if save_txt:
            (self.save_dir / "labels").mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def write(self, frame: Frame, det: np.ndarray, names: list[str]) -> None:
        """Save everything asked for one frame; `det` is `[n, 6]` in the frame's own pixels."""
        per_frame = frame.kind != "image"
        stem = f"{frame.stem}_{frame.index}" if per_frame else frame.stem
        if self.save_txt:
            rows = label_lines(det, frame.image.shape[:2], self.save_conf)
            (self.save_dir / "labels" / f"{stem}.txt").write_text("".join(r + "\n" for r in rows))
            self.counts["labels"] += 1
        if self.save_crop and len(det):
            self._crops(frame.image, det, names, stem)
        if not (self.save_img or self.view_img):
            return
        img = draw_boxes(frame.image, det[:, :4], det[:, 5], det[:, 4], names, **self.draw_args)
        if self.save_img:
            if per_frame:
                self._video_frame(frame, img)
            else:
                _imwrite(self.save_dir / Path(frame.path).name, img)
                self.counts["images"] += 1
        if self.view_img:
            self._show(frame.path, img)

    def _crops(self, img: np.ndarray, det: np.ndarray, names: list[str], stem: str) -> None:
        for k, (*box, _conf, cls) in enumerate(det):
            crop = crop_box(img, box)
            if crop is None:
                continue
            c = int(cls)
            folder = self.save_dir / "crops" / _safe_name(names[c] if c < len(names) else str(c))
            folder.mkdir(parents=True, exist_ok=True)
            _imwrite(folder / f"{stem}_{k}.jpg", crop)
            self.counts["crops"] += 1

    def _video_frame(self, frame: Frame, img: np.ndarray) -> None:
        if frame.path != self._video_key:
            self._release_video()
            path = self.save_dir / f"{frame.stem}.mp4"
            fps = frame.fps / self.vid_stride
            h, w = img.shape[:2]
            self._video = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
            if not self._video.isOpened():
                raise OSError(f"{path}: OpenCV could not open a video writer (mp4v)")
            self._video_key = frame.path
            self.counts["videos"] += 1
        self._video.write(img)

    def _release_video(self) -> None:
        if self._video is not None:
            self._video.release()
        self._video, self._video_key = None, None

    def _show(self, title: str, img: np.ndarray) -> None:
        try:
            cv2.imshow(title, img)
            cv2.waitKey(1)
        except cv2.error:
            # headless OpenCV builds (and machines with no display) cannot open windows: say so once
            LOGGER.warning("--view-img: this OpenCV/display cannot open windows (headless); not showing results")
            self.view_img = False

    def close(self) -> None:
        """Finish the open video file and close any window."""
        self._release_video()
        if self.view_img:
            try:
                cv2.destroyAllWindows()
            except cv2.error:
                pass
