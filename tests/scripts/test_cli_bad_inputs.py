"""docs/RELIABILITY.md at the command line: a catalogued bad input ends in one line `<script>: error: ...`
(exit 2, no traceback, no run folder), or, when it can be skipped, in warnings naming it and a closing
summary that counts it ("1 image skipped: see above"). In-process through `cli_main` (cheap); two
representative rows also run as real subprocesses (slow)."""
from __future__ import annotations

import importlib
import socket
import subprocess
import sys
import threading
from pathlib import Path

import onnx
import pytest
import torch
import yaml
from torch import nn

from models.checkpoint import load_checkpoint
from models.yolo import Model
from tests.backend_helpers import TINY, make_checkpoint, make_images
from utils.core.errors import cli_main
from utils.data.synthetic import make_synthetic_dataset
from utils.export.metadata import export_metadata
from utils.train.setup import transfer_weights

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("bad")
    data = make_synthetic_dataset(tmp / "ds", n_train=2, n_val=2, imgsz=64, nc=2)
    (tmp / "ds" / "images" / "val" / "zero.jpg").write_bytes(b"")  # one val image to skip
    three = tmp / "three.yaml"
    three.write_text(yaml.safe_dump({"path": str(tmp / "ds"), "train": "images/train", "val": "images/val",
                                     "names": ["a", "b", "c"]}))
    syntax = tmp / "syntax.yaml"
    syntax.write_text(f"path: {tmp / 'ds'}\ntrain: [images/train\nval: images/val\n")
    unset = tmp / "unset.yaml"
    unset.write_text("path: $MOBILEYOLO_UNSET_ROOT/ds\ntrain: images/train\nval: images/val\nnames: [a, b]\n")
    folder = tmp / "mix"
    make_images(folder, n=2)
    (folder / "broken.jpg").write_text("not an image")
    return {"data": data, "three": three, "syntax": syntax, "unset": unset, "folder": folder,
            "weights": make_checkpoint(tmp / "w.pt", imgsz=64), "other_onnx": _other_onnx(tmp / "other.onnx")}


def _other_onnx(path: Path) -> Path:
    """Another model's graph ([1, 3, 64, 64] -> [1, 256, 9]) carrying our metadata for 2 classes (5 + 2 = 7)."""
    class Other(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.avg_pool2d(x, 4).repeat(1, 3, 1, 1).flatten(2).transpose(1, 2)

    torch.onnx.export(Other(), (torch.zeros(1, 3, 64, 64),), str(path), dynamo=False, opset_version=17)
    g = onnx.load(str(path))
    for k, v in export_metadata(["a", "b"], [8.0, 16.0], (64, 64), 1, False).items():
        g.metadata_props.add(key=k, value=v)
    onnx.save(g, str(path))
    return path


@pytest.fixture
def quiet_policy(monkeypatch):
    monkeypatch.setenv("MOBILEYOLO_RUNTIME_POLICY", "0")  # in-process runs leave this process's threads alone


def _run(script: str, argv: list[str], capsys) -> tuple[int, str, str]:
    main = importlib.import_module(script.removesuffix(".py")).main
    rc = cli_main(script, main, argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _one_error_line(script: str, rc: int, err: str, *words: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and "Traceback" not in err, err
    assert lines and lines[-1].startswith(f"{script}: error: ") and sum(ln.startswith(f"{script}: error:") for ln in lines) == 1
    for w in words:
        assert w in lines[-1], lines[-1]


ERRORS = [  # id, script, flags ({files} placeholders), words of the error line
    ("val-class-count", "val.py", ["--data", "{three}", "--weights", "{weights}"],
     ["w.pt: model has 2 classes but", "three.yaml has 3"]),
    ("val-yaml-syntax", "val.py", ["--data", "{syntax}", "--weights", "{weights}"],
     ["syntax.yaml:3:4: not valid YAML (expected ',' or ']'"]),
    ("train-yaml-syntax", "train.py", ["--data", "{syntax}"], ["syntax.yaml:3:4: not valid YAML"]),
    ("train-unset-env", "train.py", ["--data", "{unset}"],
     ["unset.yaml: 'path' uses environment variable $MOBILEYOLO_UNSET_ROOT, which is not set"]),
    ("detect-onnx-other-model", "detect.py", ["--weights", "{other_onnx}", "--source", "{folder}"],
     ["other.onnx: input", "do not fit its metadata", "5 + 2] out): another model's graph"]),
    ("detect-camera", "detect.py", ["--weights", "{weights}", "--source", "77"], ["camera 77: no such camera"]),
]
OUTPUT = {"train.py": ["--epochs", "1", "--workers", "0", "--imgsz", "64", "--noplots"],
          "val.py": ["--workers", "0", "--imgsz", "64", "--noplots"], "detect.py": ["--imgsz", "64"]}


@pytest.mark.parametrize("script, flags, words", [c[1:] for c in ERRORS], ids=[c[0] for c in ERRORS])
def test_bad_input_is_one_error_line(files, tmp_path, capsys, quiet_policy, monkeypatch, script, flags, words):
    monkeypatch.delenv("MOBILEYOLO_UNSET_ROOT", raising=False)
    argv = OUTPUT[script] + ["--project", str(tmp_path / "runs")] + [f.format(**files) for f in flags]
    rc, _, err = _run(script, argv, capsys)
    _one_error_line(script, rc, err, *words)
    assert not (tmp_path / "runs").exists(), "a failed start must not leave a run folder"


def test_stream_that_hangs_is_one_error_line_after_the_timeout(files, tmp_path, capsys, quiet_policy, monkeypatch):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    held = []
    threading.Thread(target=lambda: held.append(srv.accept()[0]), daemon=True).start()
    monkeypatch.setenv("MOBILEYOLO_STREAM_TIMEOUT", "1")
    url = f"rtsp://127.0.0.1:{srv.getsockname()[1]}/cam"
    try:
        rc, _, err = _run("detect.py", ["--weights", str(files["weights"]), "--source", url,
                                        "--project", str(tmp_path / "runs")], capsys)
    finally:
        srv.close()
        for c in held:
            c.close()
    _one_error_line("detect.py", rc, err, f"{url}: could not open video/stream: stream unreachable, no answer within 1 s")


def test_val_counts_skipped_images_in_its_summary(files, tmp_path, capsys, caplog, quiet_policy):
    """(In-process the warnings reach pytest's log capture; the subprocess test below reads them on stderr.)"""
    rc, out, err = _run("val.py", OUTPUT["val.py"] + ["--data", str(files["data"]), "--weights", str(files["weights"]),
                                                      "--project", str(tmp_path / "runs")], capsys)
    zero = files["data"].parent / "images" / "val" / "zero.jpg"
    assert rc == 0 and "Traceback" not in err
    assert f"{zero}: zero-byte file; image skipped" in caplog.text
    assert out.rstrip().splitlines()[-1].endswith(". 1 image skipped: see above")


def test_detect_counts_skipped_images_in_its_summary(files, tmp_path, capsys, caplog, quiet_policy):
    rc, out, err = _run("detect.py", OUTPUT["detect.py"] + ["--weights", str(files["weights"]), "--source",
                                                            str(files["folder"]), "--project", str(tmp_path / "r")], capsys)
    assert rc == 0 and "Traceback" not in err
    assert f"{files['folder'] / 'broken.jpg'}: image could not be decoded; skipped" in caplog.text
    last = out.rstrip().splitlines()[-1]
    assert last.startswith("2 frames") and last.endswith(". 1 image skipped: see above")


@pytest.mark.slow
def test_subprocess_detect_skips_and_counts(files, tmp_path):
    proc = subprocess.run([sys.executable, "detect.py", "--weights", str(files["weights"]), "--source",
                           str(files["folder"]), "--imgsz", "64", "--project", str(tmp_path / "r")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    assert f"{files['folder'] / 'broken.jpg'}: image could not be decoded; skipped" in proc.stderr
    assert proc.stdout.rstrip().splitlines()[-1].endswith(". 1 image skipped: see above")


@pytest.mark.slow
def test_subprocess_val_class_count_is_one_line(files, tmp_path):
    proc = subprocess.run([sys.executable, "val.py", "--data", str(files["three"]), "--weights", str(files["weights"]),
                           "--imgsz", "64", "--workers", "0", "--project", str(tmp_path / "r")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    _one_error_line("val.py", proc.returncode, proc.stderr, "model has 2 classes but")
    assert not (tmp_path / "r").exists()


def test_train_weights_of_another_class_count_fine_tune_with_a_fresh_head(files):
    """train.py --weights with a checkpoint of 2 classes on 3-class data is fine-tuning, not an error:
    every tensor whose shape fits moves over, the head's class outputs start fresh (and are counted)."""
    model = Model(TINY, nc=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moved, total = transfer_weights(model, files["weights"])
    src = load_checkpoint(files["weights"])["model"]
    head = [k for k in before if k.startswith("layers.5.m.")]  # the Detect convs: 3 * (5 + nc) outputs
    assert head and moved == total - len(head) - 1  # all but the head convs and the anchors buffer
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in head)  # not loaded: another shape
    assert all(torch.equal(after[k], src[k]) for k in after if k not in head and "anchors" not in k)
