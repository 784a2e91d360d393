"""ExecuTorch export (XNNPACK .pte, float32 and INT8) and its runner: parity with PyTorch through
DetectBackend, metadata inside the program, batches in chunks, INT8 close to float, detect.py and val.py,
a missing package, corrupt and truncated files.

Importing executorch and lowering take several seconds, so the export is a module fixture and every test
here is in the slow tier."""
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
from utils.infer.backend import BackendError, DetectBackend

pytestmark = pytest.mark.slow
NAMES = ["cell", "blob"]


@pytest.fixture(scope="module")
def exported_all(tmp_path_factory):
    """(checkpoint, {"executorch": best.pte, "executorch-int8": best_int8.pte}) of the tiny two-level model
    at 64 px, objectness high; float32 parity-checked, INT8 calibrated on 4 images and gated."""
    root = tmp_path_factory.mktemp("et")
    pt = make_checkpoint(root / "best.pt", names=NAMES, imgsz=64, obj_logit=3.0)
    data = make_synthetic_dataset(root / "syn", n_train=4, n_val=2, imgsz=96, nc=2)
    return pt, export.run(pt, include=["executorch"], imgsz=64, threads=1, int8=True, data=data, calib_images=4)


@pytest.fixture(scope="module")
def exported(exported_all):
    """(checkpoint, best.pte)."""
    return exported_all[0], exported_all[1]["executorch"]


def test_parity_batches_and_metadata_inside_the_program(exported, tmp_path):
    pt, file = exported
    assert file == pt.parent / "best.pte"
    moved = tmp_path / "renamed.pte"
    shutil.copy(file, moved)
    b = DetectBackend(moved, threads=1)
    assert (b.fmt, b.names, b.imgsz, b.stride, b.dynamic) == ("executorch", NAMES, (64, 64), 16, False)
    ref_backend = DetectBackend(pt)
    for n in (1, 3):  # the program's batch is 1: three images run as three chunks
        x = torch.rand(n, 3, 64, 64)
        p = export.compare("executorch", ref_backend(x), b(x))
        assert p.ok, str(p)
    with pytest.raises(BackendError, match="64x64"):
        b(torch.rand(1, 3, 96, 96))


def test_int8_program_is_smaller_and_close(exported_all):
    pt, files = exported_all
    q = files["executorch-int8"]
    assert q == pt.parent / "best_int8.pte"
    # the tiny model's 40 k weights are few next to the program's own overhead; MobileNetV3-Small-YOLO's
    # INT8 .pte is 0.35x its float32 one (README, export section)
    assert q.stat().st_size < 0.6 * files["executorch"].stat().st_size
    b = DetectBackend(q, threads=1)
    assert b.names == NAMES and b.imgsz == (64, 64)
    x = export.reference_batch((64, 64), batch=2)
    ref, out = DetectBackend(pt)(x), b(x)
    assert (out[..., :4] - ref[..., :4]).abs().max() < 0.25 * ref[..., 2:4].abs().max(), "INT8 boxes far off"
    assert (out[..., 4:] - ref[..., 4:]).abs().max() < 0.25
    assert not torch.equal(out, ref)  # it is quantized


def test_detect_and_val_accept_the_file(exported, tmp_path):
    pt, file = exported
    assert_detect_and_val_match(pt, file, tmp_path, rect=False)


def test_missing_package_gives_one_line_naming_the_requirements(exported, tmp_path, monkeypatch):
    pt, file = exported
    monkeypatch.setitem(sys.modules, "executorch.exir", None)
    with pytest.raises(MissingPackageError, match=r"executorch needs executorch: pip install -r requirements-export.txt"):
        export.run(pt, include=["executorch"], imgsz=64, outdir=tmp_path, threads=1)
    monkeypatch.setitem(sys.modules, "executorch.runtime", None)
    with pytest.raises(BackendError, match=r"needs executorch: pip install -r requirements-export.txt") as e:
        DetectBackend(file)
    assert str(file) in str(e.value) and "\n" not in str(e.value)


def test_corrupt_truncated_and_foreign_files_are_refused_naming_the_file(exported, tmp_path):
    _, file = exported
    data = file.read_bytes()
    for name, content in (("truncated.pte", data[: len(data) // 2]), ("head.pte", data[:64]),
                          ("noise.pte", np.random.default_rng(0).bytes(4096)), ("empty.pte", b"")):
        bad = tmp_path / name
        bad.write_bytes(content)
        with pytest.raises(BackendError, match=name):
            DetectBackend(bad)
