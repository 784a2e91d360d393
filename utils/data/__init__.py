"""Data pipeline: data YAML, label checks, scan cache, augmentation, dataset, loader, converters.

The main names are re-exported lazily (PEP 562), so `import utils.data.synthetic` stays light:
`from utils.data import check_dataset, create_dataloader, letterbox, load_hyp`.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "check_dataset": "data_yaml", "DataConfig": "data_yaml", "DataConfigError": "data_yaml", "load_hyp": "data_yaml",
    "list_image_files": "data_yaml", "img2label_path": "data_yaml", "IMG_FORMATS": "data_yaml",
    "letterbox": "letterbox", "YoloDataset": "dataset", "create_dataloader": "loader", "collate_fn": "loader",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"utils.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'utils.data' has no attribute {name!r}")
