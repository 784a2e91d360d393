"""(Run by tests/export/test_openvino.py in its own process.) OpenVINO export: float parity through DetectBackend, INT8 gate, detect.py/val.py, bad files, missing package."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import detect
import export
import val
from tests.backend_helpers import make_checkpoint, make_images
from utils.core.paths import ROOT
from utils.data.synthetic import make_synthetic_dataset
from utils.export.headmaps import MissingPackageError
from utils.export.metadata import METADATA_YAML, parse_metadata, read_metadata_yaml
from utils.infer.backend import BackendError, DetectBackend

pytestmark = pytest.mark.slow  # OpenVINO's converter takes seconds even for a tiny model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny 2-class checkpoint, its float OpenVINO export at 64 px, and the reference batch."""
    root = tmp_path_factory.mktemp("ov")
    pt = make_checkpoint(root / "best.pt", imgsz=64, obj_logit=3.0)
    files = export.run(pt, include=["openvino"], imgsz=64)
    return pt, files["openvino"], export.reference_batch((64, 64))


def test_round_trip_matches_pytorch(exported):
    pt, folder, x = exported
    assert folder.name == "best_openvino_model"
    assert sorted(p.name for p in folder.iterdir()) == ["best.bin", "best.xml", METADATA_YAML]
    meta = parse_metadata(read_metadata_yaml(folder))
    assert meta["precision"] == "fp32" and len(meta["anchors"]) == 2 and meta["imgsz"] == [64, 64]
    ref = DetectBackend(pt)(x)
    for path in (folder, folder / "best.xml"):  # the folder or its .xml
        b = DetectBackend(path, threads=1)
        assert b.fmt == "openvino" and b.names == ["class0", "class1"] and b.imgsz == (64, 64)
        assert not b.dynamic and b.batch == 1
        assert export.compare("openvino", ref, b(x)).ok
    b = DetectBackend(folder)
    y = b(torch.cat([x, x.flip(-1), x]))  # a fixed batch-1 export runs a batch of 3 in chunks
    assert y.shape[0] == 3 and torch.allclose(y[0], y[2]) and not torch.allclose(y[0], y[1])
    with pytest.raises(BackendError, match="fixed-size export takes 64x64"):
        b(torch.zeros(1, 3, 96, 96))


def test_detect_and_val_take_the_folder(exported, tmp_path):
    pt, folder, _ = exported
    make_images(tmp_path / "img", n=2, size=(80, 60))
    det = detect.run(weights=folder, source=tmp_path / "img", imgsz=64, project=tmp_path / "d", conf_thres=0.25)
    assert det.writer.counts["images"] == 2
    data = make_synthetic_dataset(tmp_path / "data", n_train=2, n_val=2, imgsz=64)
    m = val.run(data, folder, imgsz=64, workers=0, project=tmp_path / "v", plots=False)
    m_pt = val.run(data, pt, imgsz=64, workers=0, project=tmp_path / "v", plots=False, rect=False)
    assert m.n_images == 2 and abs(m.map - m_pt.map) < 1e-3


def test_truncated_or_missing_parts_are_refused(exported, tmp_path):
    _, folder, _ = exported
    bad = tmp_path / "bad_openvino_model"
    bad.mkdir()
    for f in folder.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    data = (bad / "best.bin").read_bytes()
    (bad / "best.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(BackendError, match="best"):
        DetectBackend(bad)
    (bad / "best.bin").unlink()
    with pytest.raises(BackendError, match=r"best\.bin: weights file of best\.xml not found"):
        DetectBackend(bad)
    (bad / "best.xml").write_text("<net><layers>")
    (bad / "best.bin").write_bytes(data)
    with pytest.raises(BackendError, match=r"best\.xml: not a valid OpenVINO IR"):
        DetectBackend(bad)
    (bad / "best.xml").write_bytes((folder / "best.xml").read_bytes())
    (bad / METADATA_YAML).write_text("names: [a\n")
    with pytest.raises(BackendError, match=METADATA_YAML):
        DetectBackend(bad)
    (bad / METADATA_YAML).unlink()
    with pytest.raises(BackendError, match="no MobileYOLO metadata"):
        DetectBackend(bad)
    empty = tmp_path / "empty_openvino_model"
    empty.mkdir()
    with pytest.raises(BackendError, match=r"no \.xml file"):
        DetectBackend(empty)


def test_missing_openvino_is_one_line(exported, monkeypatch, tmp_path):
    pt, folder, _ = exported
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    with pytest.raises(BackendError) as e:
        DetectBackend(folder)
    assert "needs openvino: pip install -r requirements-export.txt" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(MissingPackageError, match="--include openvino needs openvino: pip install -r "
                                                  "requirements-export.txt"):
        export.run(pt, include=["openvino"], imgsz=64, outdir=tmp_path)


def test_int8_gate(tmp_path):
    """NNCF runs in its own process, as a user's `export.py --int8` does: once imported, NNCF keeps a
    telemetry thread pool alive, and in one long pytest process with Inductor compiles after it that
    process crashed (SIGSEGV in take_gil), so the suite keeps NNCF out of its own process."""
    data = make_synthetic_dataset(tmp_path / "data", n_train=4, n_val=2, imgsz=64)
    pt = make_checkpoint(tmp_path / "best.pt", imgsz=64, obj_logit=3.0)
    cmd = [sys.executable, "export.py", "--weights", str(pt), "--include", "openvino", "--imgsz", "64",
           "--int8", "--data", str(data), "--calib-images", "4"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "NNCF_CI": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    q = tmp_path / "best_int8_openvino_model"
    assert DetectBackend(q).fmt == "openvino"
    assert parse_metadata(read_metadata_yaml(q))["precision"] == "int8"
    out = res.stdout
    assert "INT8 check on" in out and "best_int8_openvino_model" in out and "mAP50-95" in out
    ov_xml = (q / "best.xml").read_text()
    assert "FakeQuantize" in ov_xml or "FakeConvert" in ov_xml  # NNCF's quantization nodes are in the IR


CHILD = r"""
import gc, os, signal, sys, threading
sys.path.insert(0, {root!r})
import numpy as np
from utils.infer.formats.openvino import OpenVINORunner
x = np.zeros((1, 3, 64, 64), np.float32)
a, b = OpenVINORunner({folder!r}), OpenVINORunner({folder!r})
a(x), b(x)
del a; gc.collect()  # out of creation order
del b; gc.collect()
c = [OpenVINORunner({folder!r})]
t = threading.Thread(target=c.clear)  # released on another thread
t.start(); t.join(); gc.collect()
signal.signal(signal.SIGUSR1, lambda *_: print("handler ran", flush=True))
os.kill(os.getpid(), signal.SIGUSR1)
print("survived", flush=True)
"""


def test_runners_released_in_any_order_leave_signals_working(exported, tmp_path):
    """Each ov.Core's CPU plugin swaps the thread's alternate signal stack; released out of order, one
    freed stack was left installed and the next Python signal handler crashed the process (SIGSEGV).
    All runners share one Core (`shared_core`), so that cannot happen."""
    _, folder, _ = exported
    child = tmp_path / "child.py"
    child.write_text(CHILD.format(root=str(ROOT), folder=str(folder)))
    res = subprocess.run([sys.executable, str(child)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.returncode, res.stderr[-2000:])
    assert res.stdout.splitlines()[-2:] == ["handler ran", "survived"]
