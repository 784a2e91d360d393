"""NCNN export (pnnx) and its runner: parity with PyTorch through DetectBackend, detect.py and val.py on the
folder, any input size and batch, a missing package, corrupt and truncated files."""
from __future__ import annotations

import shutil
import sys

import pytest
import torch

import export
from tests.backend_helpers import assert_detect_and_val_match, make_checkpoint
from utils.export.headmaps import MissingPackageError
from utils.infer.backend import BackendError, DetectBackend

NAMES = ["cell", "blob"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(checkpoint, best_ncnn_model/) of the tiny two-level model at 64 px, objectness high."""
    root = tmp_path_factory.mktemp("ncnn")
    pt = make_checkpoint(root / "best.pt", names=NAMES, imgsz=64, obj_logit=3.0)
    files = export.run(pt, include=["ncnn"], imgsz=64, threads=1)  # raises ExportError on a parity miss
    return pt, files["ncnn"]


def test_folder_layout_metadata_and_parity_at_other_sizes_and_batches(exported):
    pt, folder = exported
    assert folder == pt.parent / "best_ncnn_model"
    assert sorted(p.name for p in folder.iterdir()) == ["metadata.yaml", "model.ncnn.bin", "model.ncnn.param"]
    assert not list(pt.parent.glob("*.pnnx.*")) and not list(pt.parent.glob("*_pnnx.py")), "pnnx by-products leaked"
    ref_backend = DetectBackend(pt)
    for path in (folder, folder / "model.ncnn.param"):  # the folder or its .param
        b = DetectBackend(path, threads=1)
        assert (b.fmt, b.names, b.imgsz, b.stride, b.dynamic, b.batch) == ("ncnn", NAMES, (64, 64), 16, True, None)
        for shape in ((1, 3, 64, 64), (3, 3, 96, 128)):  # the graph is size-generic; a batch runs image by image
            x = torch.rand(*shape)
            p = export.compare("ncnn", ref_backend(x), b(x))
            assert p.ok, str(p)


@pytest.mark.slow  # a val run and two detect runs (~4 s)
def test_detect_and_val_accept_the_folder(exported, tmp_path):
    pt, folder = exported
    assert_detect_and_val_match(pt, folder, tmp_path)


def test_missing_packages_give_one_line_naming_the_requirements(exported, tmp_path, monkeypatch):
    pt, folder = exported
    monkeypatch.setitem(sys.modules, "pnnx", None)  # `import pnnx` now raises ImportError
    with pytest.raises(MissingPackageError, match=r"ncnn needs pnnx: pip install -r requirements-export.txt") as e:
        export.run(pt, include=["ncnn"], imgsz=64, outdir=tmp_path, threads=1)
    assert "\n" not in str(e.value)
    monkeypatch.setitem(sys.modules, "ncnn", None)
    with pytest.raises(BackendError, match=r"needs ncnn: pip install -r requirements-export.txt") as e:
        DetectBackend(folder)
    assert str(folder) in str(e.value) and "\n" not in str(e.value)


def test_corrupt_truncated_or_incomplete_folders_are_refused_naming_the_file(exported, tmp_path):
    _, folder = exported
    bad = tmp_path / "bad_ncnn_model"
    shutil.copytree(folder, bad)
    weights = bad / "model.ncnn.bin"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(BackendError, match="model.ncnn.bin.*corrupt or truncated"):
        DetectBackend(bad)
    param = bad / "model.ncnn.param"
    shutil.copy(folder / "model.ncnn.bin", weights)
    lines = param.read_text().splitlines()
    param.write_text("\n".join(lines[: len(lines) // 2]) + "\n")  # cut mid-graph
    with pytest.raises(BackendError, match="model.ncnn.param"):
        DetectBackend(bad)
    param.write_text("not an ncnn file\n")
    with pytest.raises(BackendError, match="model.ncnn.param.*magic"):
        DetectBackend(bad)
    shutil.copy(folder / "model.ncnn.param", param)
    (bad / "metadata.yaml").unlink()
    with pytest.raises(BackendError, match="metadata"):
        DetectBackend(bad)
    weights.unlink()
    with pytest.raises(BackendError, match="model.ncnn.bin"):
        DetectBackend(bad)
    empty = tmp_path / "empty_ncnn_model"
    empty.mkdir()
    with pytest.raises(BackendError, match="empty_ncnn_model"):
        DetectBackend(empty)


def test_threads_default_to_the_idle_cores(exported, monkeypatch):
    from utils.infer import backend

    _, folder = exported
    monkeypatch.setattr(backend, "idle_cores", lambda: 1)  # everything else busy: one worker, not one per core
    monkeypatch.setattr(backend, "physical_cores", lambda: 8)
    assert DetectBackend(folder).runner.net.opt.num_threads == 1
    assert DetectBackend(folder, threads=3).runner.net.opt.num_threads == 3  # an explicit count wins
