"""utils.export.metadata: the schema every export writes and every backend reads back."""
from __future__ import annotations

import json

import pytest

from utils.export.metadata import FORMAT, export_metadata, parse_metadata


def test_round_trip_keeps_every_key_and_type():
    meta = export_metadata(["rbc", "wbc", "platelets"], [8, 16.0, 32], (320, 256), 2, False)
    assert all(isinstance(v, str) for v in meta.values())  # ONNX metadata_props take strings only
    back = parse_metadata(meta)
    assert back == {"names": ["rbc", "wbc", "platelets"], "nc": 3, "stride": 32, "strides": [8.0, 16.0, 32.0],
                    "imgsz": [320, 256], "batch": 2, "dynamic": False, "format": FORMAT}


def test_already_decoded_and_extra_values_pass_through():
    decoded = parse_metadata(export_metadata(["a"], [32], (64, 64), 1, True))  # values, not JSON strings
    back = parse_metadata({**decoded, "author": "not json {"})
    assert back == {**decoded, "author": "not json {"} and back["dynamic"] is True


def test_foreign_metadata_is_refused():
    good = export_metadata(["a"], [32], (64, 64), 1, False)
    assert parse_metadata({}) is None
    assert parse_metadata({k: v for k, v in good.items() if k != "format"}) is None  # another tool's file
    assert parse_metadata({**good, "format": json.dumps("yolov5")}) is None
    assert parse_metadata({**good, "names": json.dumps("a")}) is None  # names must be a list
    assert parse_metadata({**good, "names": "[broken"}) is None


def test_anchors_and_metadata_yaml_round_trip(tmp_path):
    import torch

    from utils.export.metadata import (
        METADATA_YAML,
        read_metadata_yaml,
        write_metadata_yaml,
    )

    anchors = torch.tensor([[[10.0, 13.0], [16.0, 30.0]], [[30.0, 61.0], [62.0, 45.0]]])
    meta = export_metadata(["a", "b"], [8.0, 16.0], (64, 96), 1, False, anchors=anchors)
    assert parse_metadata(meta)["anchors"] == anchors.tolist()
    assert "anchors" not in export_metadata(["a"], [8.0], (64, 64), 1, False)  # old files stay as they were
    write_metadata_yaml(meta, tmp_path)
    assert read_metadata_yaml(tmp_path) == meta and (tmp_path / METADATA_YAML).read_text().startswith("names:")
    assert read_metadata_yaml(tmp_path / "nowhere") == {}
    (tmp_path / METADATA_YAML).write_text("names: [a\n")
    with pytest.raises(ValueError, match=METADATA_YAML):
        read_metadata_yaml(tmp_path)
