"""torch.hub entry point: load a trained MobileYOLO detector from a local clone, offline.

    import torch
    model = torch.hub.load("path/to/MobileYOLO", "custom", path="best.pt", source="local")
    results = model("image.jpg")          # or a list of paths, BGR numpy arrays, PIL images, tensors
    results.print()

`path` is any file `utils.infer.backend.DetectBackend` loads (.pt checkpoint, .onnx, .torchscript, ...);
nothing is downloaded. Keywords go to `utils.infer.predictor.Predictor` (size, conf, iou, classes,
max_det, agnostic, threads, compile, ...). Without torch.hub: `from utils.infer.predictor import Predictor`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from utils.infer.predictor import Predictor as _Predictor

if TYPE_CHECKING:  # only names for annotations: whatever is callable here, torch.hub.list shows as a model
    from pathlib import Path
    from typing import Any

# torch.hub checks that these modules are importable before calling an entry point
dependencies = ["torch", "torchvision", "numpy", "cv2", "yaml", "PIL"]


def custom(path: str | Path, **kwargs: Any) -> _Predictor:
    """A `Predictor` for the weights file `path` (relative paths: from the working directory); `kwargs`
    are `Predictor`'s (e.g. `conf=0.3, size=320`). Raises `BackendError` for a missing or unusable file."""
    return _Predictor(path, **kwargs)
