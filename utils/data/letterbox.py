"""Letterbox: resize keeping the aspect ratio, then pad to the target shape (or to a stride multiple)."""
from __future__ import annotations

import math

import cv2
import numpy as np


def letterbox(img: np.ndarray, new_shape: int | tuple[int, int] = 320, color: tuple[int, int, int] = (114, 114, 114),
              auto: bool = False, scaleup: bool = True, stride: int = 32
              ) -> tuple[np.ndarray, tuple[float, float], tuple[float, float]]:
    """Fit `img` [h, w, C] into `new_shape` (int, or (h, w)) -> (img, (rh, rw), (padw, padh)).

    The image is scaled by one gain r = rh = rw (never up when `scaleup` is False), centred, and padded
    with `color`. `padw`/`padh` are the left/top pads in pixels (possibly fractional: the left/top side
    gets the rounded-down half). With `auto`, the padded size is the smallest stride multiple instead
    of `new_shape`. A box maps as x' = x * rw + padw, y' = y * rh + padh.
    """
    h0, w0 = img.shape[:2]
    nh, nw = (new_shape, new_shape) if isinstance(new_shape, int) else new_shape
    r = min(nh / h0, nw / w0)
    if not scaleup:
        r = min(r, 1.0)
    w, h = round(w0 * r), round(h0 * r)
    if auto:
        nw, nh = math.ceil(w / stride) * stride, math.ceil(h / stride) * stride
    dw, dh = (nw - w) / 2, (nh - h) / 2
    if (w, h) != (w0, h0):
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR if r > 1 else cv2.INTER_AREA)
    top, left = int(round(dh - 0.1)), int(round(dw - 0.1))
    bottom, right = nh - h - top, nw - w - left
    if top or bottom or left or right:
        img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=color)
    # the exact per-axis gain after rounding the resized size keeps the inverse mapping exact
    return img, (h / h0, w / w0), (float(left), float(top))
