"""benchmarks/int8_size.py: the INT8 file's parts add up to its size and count what the model holds."""
from __future__ import annotations

import contextlib
import io

import export
from models.checkpoint import load_checkpoint, model_from_checkpoint
from tests.backend_helpers import make_checkpoint
from utils.data.synthetic import make_synthetic_dataset


def test_int8_size_parts(tmp_path, capsys):
    from benchmarks import int8_size

    data = make_synthetic_dataset(tmp_path / "data", n_train=3, n_val=1, imgsz=64)
    pt = make_checkpoint(tmp_path / "best.pt", imgsz=64)
    assert int8_size.run(pt) == []  # nothing exported yet
    assert "no float32/INT8 pairs of best.pt in" in capsys.readouterr().out
    with contextlib.redirect_stdout(io.StringIO()):
        export.run(pt, include=["onnx"], imgsz=64, int8=True, data=data, calib_images=2, gate=False)
    (fmt, f_size, q_size, parts), = int8_size.run(pt)
    assert fmt == "onnx" and f_size == (tmp_path / "best.onnx").stat().st_size
    assert q_size == (tmp_path / "best-int8.onnx").stat().st_size == sum(parts.values())
    n_w, n_c = int8_size.model_counts(pt)
    head = list(model_from_checkpoint(load_checkpoint(pt)).detect.m)
    head_w, head_c = sum(m.weight.numel() for m in head), sum(m.weight.shape[0] for m in head)
    assert parts["int8 w"] == n_w - head_w  # every conv but the float head's, one byte per weight
    assert parts["per-ch"] >= 4 * (n_c - head_c)  # a float32 scale per quantized output channel at least
    assert parts["graph"] > 0
    out = capsys.readouterr().out
    assert f"{n_w:,} weights, {n_c:,} output channels" in out and "\nonnx " in out
    assert int8_size.run(pt, tmp_path / "data") == []  # another folder: no exports there
