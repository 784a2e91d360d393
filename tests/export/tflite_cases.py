"""(Run by tests/export/test_tflite.py in its own process.) TFLite export (litert-torch, ai-edge-quantizer) and its runner: float32 parity through DetectBackend,
embedded metadata that survives copying, batches in chunks, INT8 with the mAP gate, detect.py and val.py,
a missing package, corrupt and truncated files.

litert-torch takes ~10 s to import and a few seconds per conversion, so the exports are module fixtures
and every test here is in the slow tier."""
from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest
import torch

import export
from tests.backend_helpers import assert_detect_and_val_match, make_checkpoint
from utils.data.synthetic import make_synthetic_dataset
from utils.export.headmaps import MissingPackageError
from utils.export.tflite import read_tflite_metadata
from utils.infer.backend import BackendError, DetectBackend

pytestmark = pytest.mark.slow
NAMES = ["cell", "blob"]
# tests.backend_helpers.TINY with MobileNetV3 rows, so the INT8 path meets h-swish and squeeze-excite
TINY_HS = {
    "nc": 2, "depth_multiple": 1.0, "width_multiple": 1.0,
    "anchors": [[8, 8, 14, 14, 20, 20], [24, 24, 34, 34, 48, 48]],
    "backbone": [
        [-1, 1, "conv_bn_hswish", [8, 2]],  # 0 /2
        [-1, 1, "Conv", [16, 3, 2]],  # 1 /4
        [-1, 1, "MobileNetV3_InvertedResidual", [24, 48, 3, 2, 1, 1]],  # 2 /8 P3, SE + h-swish
        [-1, 1, "C3", [24]],  # 3
        [-1, 1, "Conv", [32, 3, 2]],  # 4 /16 P4
    ],
    "head": [[[3, 4], 1, "Detect", ["nc", "anchors"]]],
}


def _partitions(interpreter) -> int:
    """How many XNNPACK partitions the interpreter runs (1 = the whole graph delegated in one piece)."""
    nodes = interpreter._interpreter  # the Python API has no public node list
    return sum(nodes.NodeName(i) == "DELEGATE" for i in range(nodes.NumNodes()))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(checkpoint, {format: path}, data YAML): the tiny two-level model at 64 px in float32 and INT8."""
    root = tmp_path_factory.mktemp("tflite")
    pt = make_checkpoint(root / "best.pt", TINY_HS, names=NAMES, imgsz=64, obj_logit=3.0)
    data = make_synthetic_dataset(root / "syn", n_train=4, n_val=3, imgsz=96, nc=2)
    # float32: parity-checked (ExportError on a miss); INT8: calibrated on 4 train images, gated on val
    files = export.run(pt, include=["tflite"], imgsz=64, threads=1, int8=True, data=data, calib_images=4)
    return pt, files, data


def test_float32_parity_batches_and_metadata_that_travels_with_the_file(exported, tmp_path):
    pt, files, _ = exported
    file = files["tflite"]
    assert file == pt.parent / "best_float32.tflite"
    moved = tmp_path / "renamed.tflite"  # the metadata is inside the flatbuffer: one file is the whole export
    shutil.copy(file, moved)
    ref_backend = DetectBackend(pt)
    b = DetectBackend(moved, threads=1)
    assert (b.fmt, b.names, b.imgsz, b.stride, b.dynamic) == ("tflite", NAMES, (64, 64), 16, False)
    assert not b.runner.int8
    for n in (1, 3):  # the file's batch is 1: three images run as three chunks
        x = torch.rand(n, 3, 64, 64)
        p = export.compare("tflite", ref_backend(x), b(x))
        assert p.ok, str(p)
    with pytest.raises(BackendError, match="64x64"):
        b(torch.rand(1, 3, 96, 96))  # fixed-size export


def test_int8_is_full_integer_smaller_and_close(exported):
    pt, files, _ = exported
    q = files["tflite-int8"]
    assert q == pt.parent / "best_int8.tflite"
    b = DetectBackend(q, threads=1)
    assert b.runner.int8 and b.names == NAMES
    details = b.runner.interpreter.get_tensor_details()
    convs = [d for d in details if len(d["shape"]) == 4 and d["shape"][0] == 8]  # first conv's 8 filters
    assert convs and all(d["dtype"] == np.int8 for d in convs), [(d["name"], d["dtype"]) for d in convs]
    # every op XNNPACK takes in float it also takes here (an int8 HARD_SWISH would split the graph)
    assert _partitions(b.runner.interpreter) <= _partitions(DetectBackend(files["tflite"]).runner.interpreter)
    # the tiny model's 40 k weights are few next to the per-channel scales and the graph itself; a real
    # model's INT8 file is ~0.37-0.39x its float32 file (README, export section)
    assert q.stat().st_size < 0.6 * files["tflite"].stat().st_size
    x = export.reference_batch((64, 64))
    ref, out = DetectBackend(pt)(x), b(x)
    size = ref[..., 2:4].abs().max()
    assert (out[..., :4] - ref[..., :4]).abs().max() < 0.25 * size, "INT8 boxes far from float32"
    assert (out[..., 4:] - ref[..., 4:]).abs().max() < 0.25


def test_int8_gate_prints_both_maps(exported, capsys):
    _, files, data = exported
    gate = export.int8_gate(files["tflite"], files["tflite-int8"], data, 64, threads=1)
    printed = capsys.readouterr().out
    assert "best_float32.tflite" in printed and "best_int8.tflite" in printed and "mAP50-95" in printed
    assert 0.0 <= gate.int8.map <= 1.0 and 0.0 <= gate.fp32.map <= 1.0


def test_detect_and_val_accept_the_file(exported, tmp_path):
    # TINY_HS's random outputs are near-constant from cell to cell (ties that NMS may break either way),
    # so this compares detections of the plain tiny model, whose scores differ
    _, _, data = exported
    pt = make_checkpoint(tmp_path / "plain.pt", names=NAMES, imgsz=64, obj_logit=3.0)
    files = export.run(pt, include=["tflite"], imgsz=64, threads=1)
    assert_detect_and_val_match(pt, files["tflite"], tmp_path, data, rect=False)


def test_missing_packages_give_one_line_naming_the_requirements(exported, tmp_path, monkeypatch):
    pt, files, _ = exported
    monkeypatch.setitem(sys.modules, "litert_torch", None)  # `import litert_torch` now raises ImportError
    with pytest.raises(MissingPackageError, match=r"tflite needs litert_torch: pip install -r requirements-export.txt"):
        export.run(pt, include=["tflite"], imgsz=64, outdir=tmp_path, threads=1)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    with pytest.raises(BackendError, match=r"needs ai_edge_litert: pip install -r requirements-export.txt") as e:
        DetectBackend(files["tflite"])
    assert str(files["tflite"]) in str(e.value) and "\n" not in str(e.value)


def test_corrupt_truncated_and_foreign_files_are_refused_naming_the_file(exported, tmp_path):
    _, files, _ = exported
    data = files["tflite"].read_bytes()
    assert read_tflite_metadata(data)["names"] == '["cell", "blob"]'
    for name, content in (("truncated.tflite", data[: len(data) // 2]), ("head.tflite", data[:64]),
                          ("noise.tflite", np.random.default_rng(0).bytes(4096)), ("empty.tflite", b"")):
        bad = tmp_path / name
        bad.write_bytes(content)
        with pytest.raises(BackendError, match=name):
            DetectBackend(bad)
