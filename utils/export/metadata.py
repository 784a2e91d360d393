"""The metadata schema every export carries and every inference backend reads.

ONNX stores it in `metadata_props`, TorchScript in the `config.json` extra file (`METADATA_FILE`);
both hold the same keys with JSON-string values (ONNX's metadata only takes strings).
"""
from __future__ import annotations

import json
from typing import Any

METADATA_FILE = "config.json"  # TorchScript extra file holding the same keys as the ONNX metadata
FORMAT = "mobileyolo-detect-v1"


def export_metadata(names: list[str], strides: list[float], imgsz: tuple[int, int], batch: int,
                    dynamic: bool) -> dict[str, str]:
    """The metadata written into exports (all values JSON strings, as ONNX metadata_props require).

    Keys: `names` (list), `nc`, `stride` (largest, int), `strides` (per level), `imgsz` ([h, w] the
    file was exported at), `batch`, `dynamic`, `format` (`FORMAT`).
    """
    meta = {"names": list(names), "nc": len(names), "stride": int(max(strides)), "strides": [float(s) for s in strides],
            "imgsz": [int(imgsz[0]), int(imgsz[1])], "batch": int(batch), "dynamic": bool(dynamic),
            "format": FORMAT}
    return {k: json.dumps(v) for k, v in meta.items()}


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
