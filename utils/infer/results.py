"""What `Predictor` returns: `Detections`, the boxes of one call with the images they belong to.

Box forms (each a list with one float32 tensor `[n, 6]` per image, rows sorted by confidence):
`xyxy` (x1, y1, x2, y2 pixels of the original image), `xywh` (cx, cy, w, h pixels), `xyxyn` / `xywhn`
(the same normalised 0..1 by the image's width and height); columns 4 and 5 are the confidence
(objectness x class probability) and the class index. Boxes are clipped to their image.

Outputs: `print()` / `str()` (one line per image and the speed line, as detect.py prints), `render()`
(annotated copies), `save()` (annotated images and, with `save_txt`, YOLO labels, in detect.py's layout),
`crop()` (box crops, optionally saved as `crops/<class>/<stem>_<k>.jpg`), `tolist()` / `to_json()`
(plain Python / JSON), `pandas()` (DataFrames; needs pandas, which MobileYOLO does not require).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.core.draw import draw_boxes
from utils.core.errors import UserError
from utils.core.paths import increment_path
from utils.infer.sources import Frame
from utils.infer.writers import ResultWriter, crop_box
from utils.ops.boxes import xyxy2xywh

FORMS = ("xyxy", "xywh", "xyxyn", "xywhn")
_COLUMNS = {"xyxy": ("xmin", "ymin", "xmax", "ymax"), "xywh": ("xcenter", "ycenter", "width", "height")}


class ResultsError(UserError, ValueError):
    """A results method asked for something it cannot give (an unknown box form, pandas not installed)."""


class Detections:
    """The detections of one `Predictor` call (see the module docstring for the box forms).

    Attributes: `ims` (the original images, BGR uint8 `[h, w, 3]`, as given or decoded; never drawn
    on), `files` (file path, a PIL image's filename, or `image<i>.jpg` for in-memory images), `names`
    (class names, index = class id), `n` (number of images), `xyxy` / `xywh` / `xyxyn` / `xywhn`
    (`pred` is `xyxy`), `t` (pre-process, inference, NMS ms per image, measured as detect.py does),
    `speed` (the same as a dict: `pre`, `inf`, `nms`), `shape` (the network input `(B, 3, H, W)`).
    """

    def __init__(self, ims: list[np.ndarray], pred: list[torch.Tensor], files: list[str], names: list[str],
                 t: tuple[float, float, float] = (0.0, 0.0, 0.0), shape: tuple[int, ...] = ()) -> None:
        if not len(ims) == len(pred) == len(files):
            raise ValueError(f"{len(ims)} images, {len(pred)} predictions and {len(files)} files: must match")
        self.ims, self.files, self.names = ims, [str(f) for f in files], list(names)
        self.n, self.t, self.shape = len(ims), tuple(float(v) for v in t), tuple(shape)
        self.xyxy = [p.detach().float().cpu().reshape(-1, 6) for p in pred]
        self.pred = self.xyxy
        self.xywh = [xyxy2xywh(p) for p in self.xyxy]
        gains = [torch.tensor([w, h, w, h, 1.0, 1.0]) for h, w in (im.shape[:2] for im in ims)]
        self.xyxyn = [p / g for p, g in zip(self.xyxy, gains)]
        self.xywhn = [p / g for p, g in zip(self.xywh, gains)]

    @property
    def speed(self) -> dict[str, float]:
        """Milliseconds per image: `pre` (letterbox, tensor), `inf` (the model), `nms` (NMS, rescaling)."""
        return dict(zip(("pre", "inf", "nms"), self.t))

    def __len__(self) -> int:
        return self.n

    # ---- text ----------------------------------------------------------------------------------
    def _counts(self, p: torch.Tensor) -> str:
        if not len(p):
            return "(no detections)"
        classes, counts = p[:, 5].long().unique(return_counts=True)
        parts = []
        for c, k in zip(classes.tolist(), counts.tolist()):
            name = self.names[c] if 0 <= c < len(self.names) else str(c)
            parts.append(f"{k} {name}{'s' * (k > 1)}")
        return ", ".join(parts)

    def __str__(self) -> str:
        lines = [f"image {i + 1}/{self.n}: {im.shape[0]}x{im.shape[1]} {self._counts(p)}"
                 for i, (im, p) in enumerate(zip(self.ims, self.xyxy))]
        pre, inf, nms = self.t
        lines.append(f"Speed: {pre:.1f}ms pre-process, {inf:.1f}ms inference, {nms:.1f}ms NMS per image "
                     f"at shape {self.shape}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Detections({self.n} images, {sum(len(p) for p in self.xyxy)} boxes, names={self.names})"

    def print(self) -> None:
        """Print the summary: one line per image (size, boxes per class), then the speed line."""
        print(str(self))

    # ---- images --------------------------------------------------------------------------------
    def render(self, line_thickness: int = 2, hide_labels: bool = False, hide_conf: bool = False) -> list[np.ndarray]:
        """Annotated copies of the images (BGR uint8, same shapes), drawn as detect.py draws them."""
        return [draw_boxes(im.copy(), p[:, :4].numpy(), p[:, 5].numpy(), p[:, 4].numpy(), self.names,
                           line_thickness=line_thickness, hide_labels=hide_labels, hide_conf=hide_conf)
                for im, p in zip(self.ims, self.xyxy)]

    def _frames(self) -> list[Frame]:
        """One `Frame` per image (a copy: the writer draws in place), names made unique for saving."""
        seen: dict[str, int] = {}
        frames = []
        for i, (im, f) in enumerate(zip(self.ims, self.files)):
            name = Path(f).name or f"image{i}.jpg"
            if not Path(name).suffix:
                name += ".jpg"
            if name in seen:  # two inputs with the same file name: keep both
                name = f"{Path(name).stem}_{i}{Path(name).suffix}"
            seen[name] = i
            frames.append(Frame(name, im.copy(), "image"))
        return frames

    def save(self, save_dir: str | Path = "runs/detect/exp", exist_ok: bool = False, save_txt: bool = False,
             save_conf: bool = False, line_thickness: int = 2, hide_labels: bool = False,
             hide_conf: bool = False) -> Path:
        """Write the annotated images into `save_dir` (incremented: exp, exp2, ... unless `exist_ok`) and,
        with `save_txt`, `labels/<stem>.txt` rows `cls cx cy w h [conf]` (detect.py's layout). Returns the folder."""
        out = increment_path(Path(save_dir), exist_ok=exist_ok, mkdir=True)
        with ResultWriter(out, save_img=True, save_txt=save_txt, save_conf=save_conf, line_thickness=line_thickness,
                          hide_labels=hide_labels, hide_conf=hide_conf) as writer:
            for frame, p in zip(self._frames(), self.xyxy):
                writer.write(frame, p.numpy(), self.names)
        return out

    def crop(self, save_dir: str | Path | None = None, exist_ok: bool = False) -> list[dict[str, Any]]:
        """Every box's pixels: a list of dicts `file`, `box` (xyxy px), `conf`, `cls`, `label` ("name 0.87")
        and `im` (BGR uint8 crop). With `save_dir` (incremented unless `exist_ok`) the crops are also written
        as `crops/<class>/<stem>_<k>.jpg`, k the box's row, as `detect.py --save-crop` does."""
        crops = []
        for im, f, p in zip(self.ims, self.files, self.xyxy):
            for *box, conf, cls in p.tolist():
                c = int(cls)
                pixels = crop_box(im, box)
                if pixels is not None:
                    crops.append({"file": f, "box": box, "conf": conf, "cls": c,
                                  "label": f"{self._name(c)} {conf:.2f}", "im": pixels})
        if save_dir is not None:
            out = increment_path(Path(save_dir), exist_ok=exist_ok, mkdir=True)
            with ResultWriter(out, save_img=False, save_crop=True) as writer:
                for frame, p in zip(self._frames(), self.xyxy):
                    writer.write(frame, p.numpy(), self.names)
        return crops

    # ---- plain data ----------------------------------------------------------------------------
    def _name(self, c: int) -> str:
        return self.names[c] if 0 <= c < len(self.names) else str(c)

    def _boxes(self, form: str) -> list[torch.Tensor]:
        if form not in FORMS:
            raise ResultsError(f"box form '{form}': expected one of {', '.join(FORMS)}")
        return getattr(self, form)

    def tolist(self, form: str = "xyxy") -> list[dict[str, Any]]:
        """Plain Python: per image `{"file", "height", "width", "detections": [records]}`, each record
        `{xmin, ymin, xmax, ymax (or xcenter, ycenter, width, height for xywh forms), confidence, class, name}`
        in `form` units (pixels, or 0..1 for the `n` forms)."""
        keys = _COLUMNS[form.rstrip("n")] if form in FORMS else ()
        out = []
        for im, f, p in zip(self.ims, self.files, self._boxes(form)):
            recs = [{**dict(zip(keys, row[:4])), "confidence": row[4], "class": int(row[5]), "name": self._name(int(row[5]))}
                    for row in p.tolist()]
            out.append({"file": f, "height": int(im.shape[0]), "width": int(im.shape[1]), "detections": recs})
        return out

    def to_json(self, form: str = "xyxy", indent: int | None = None) -> str:
        """`tolist(form)` as a JSON string."""
        return json.dumps(self.tolist(form), indent=indent)

    def pandas(self, form: str = "xyxy") -> list[Any]:
        """One pandas DataFrame per image, columns as `tolist`'s records. Raises `ResultsError` when pandas
        is not installed (it is optional: `pip install pandas`)."""
        try:
            import pandas as pd
        except ImportError:
            raise ResultsError("Detections.pandas() needs pandas, which is not installed (pip install pandas)") from None
        keys = (*_COLUMNS[form.rstrip("n")], "confidence", "class", "name") if form in FORMS else ()
        return [pd.DataFrame(r["detections"], columns=list(keys)) for r in self.tolist(form)]
