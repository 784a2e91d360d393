"""The metadata schema every export carries and every inference backend reads.

ONNX stores it in `metadata_props`, TorchScript in the `config.json` extra file (`METADATA_FILE`),
folder formats (OpenVINO, NCNN) in `metadata.yaml` (`METADATA_YAML`); all hold the same keys with
JSON-string values (ONNX's metadata only takes strings).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

METADATA_FILE = "config.json"  # TorchScript extra file holding the same keys as the ONNX metadata
METADATA_YAML = "metadata.yaml"  # folder exports (OpenVINO, NCNN): the same keys, one per line
FORMAT = "mobileyolo-detect-v1"


def export_metadata(names: list[str], strides: list[float], imgsz: tuple[int, int], batch: int,
                    dynamic: bool, anchors: Any = None) -> dict[str, str]:
    """The metadata written into exports (all values JSON strings, as ONNX metadata_props require).

    Keys: `names` (list), `nc`, `stride` (largest, int), `strides` (per level), `imgsz` ([h, w] the
    file was exported at), `batch`, `dynamic`, `format` (`FORMAT`); with `anchors` (a [nl, na, 2]
    tensor or nested list, pixels) also `anchors`, which formats that decode outside the graph need.
    """
    meta = {"names": list(names), "nc": len(names), "stride": int(max(strides)), "strides": [float(s) for s in strides],
            "imgsz": [int(imgsz[0]), int(imgsz[1])], "batch": int(batch), "dynamic": bool(dynamic),
            "format": FORMAT}
    if anchors is not None:
        rows = anchors.tolist() if hasattr(anchors, "tolist") else anchors
        meta["anchors"] = [[[float(v) for v in pair] for pair in level] for level in rows]
    return {k: json.dumps(v) for k, v in meta.items()}


def write_metadata_yaml(meta: dict[str, str], folder: str | Path) -> Path:
    """Write `export_metadata`'s mapping as `folder/metadata.yaml` (decoded values, atomically)."""
    file = Path(folder) / METADATA_YAML
    tmp = file.with_name(f".{file.name}.tmp")
    tmp.write_text(yaml.safe_dump({k: json.loads(v) for k, v in meta.items()}, sort_keys=False))
    os.replace(tmp, file)
    return file


def read_metadata_yaml(folder: str | Path) -> dict[str, str]:
    """The raw string mapping `write_metadata_yaml` wrote; {} when the file is missing or not a mapping.

    Raises `ValueError` naming the file when it is not valid YAML.
    """
    file = Path(folder) / METADATA_YAML
    if not file.is_file():
        return {}
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8", errors="replace"))
    except yaml.YAMLError as e:
        raise ValueError(f"{file}: not valid YAML ({str(e).splitlines()[0]})") from None
    return {str(k): json.dumps(v) for k, v in data.items()} if isinstance(data, dict) else {}


def parse_metadata(meta: dict[str, Any]) -> dict[str, Any] | None:
    """Decode `export_metadata`'s strings back to values; None when `meta` is not MobileYOLO metadata."""
    out = {}
    for k, v in meta.items():
        try:
            out[k] = json.loads(v) if isinstance(v, (str, bytes)) else v
        except json.JSONDecodeError:
            out[k] = v
    if out.get("format") != FORMAT or not isinstance(out.get("names"), list):
        return None
    return out
