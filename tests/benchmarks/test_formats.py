"""benchmarks/formats.py on a tiny model and tiny data: every export gets a row with size, mAP and time."""
from __future__ import annotations

import pytest

from tests.backend_helpers import make_checkpoint
from utils.data.synthetic import make_synthetic_dataset


@pytest.mark.slow
def test_formats_table(tmp_path, capsys):
    from benchmarks import formats

    data = make_synthetic_dataset(tmp_path / "data", n_train=3, n_val=2, imgsz=64)
    pt = make_checkpoint(tmp_path / "best.pt", imgsz=64, obj_logit=3.0)
    rows = formats.run(pt, data, imgsz=64, formats=("onnx", "torchscript"), int8=True, runs=2, threads=1,
                       calib_images=2, outdir=tmp_path / "out")
    assert [(r.fmt, r.precision) for r in rows] == [("pt", "fp32"), ("onnx", "fp32"), ("onnx", "int8"),
                                                   ("torchscript", "fp32")]
    assert rows[0].ratio == 1.0 and all(r.ms > 0 and r.size_mb > 0 for r in rows)
    assert all(0.0 <= r.map <= r.map50 <= 1.0 for r in rows)
    assert abs(rows[1].map - rows[0].map) < 1e-3 and abs(rows[3].map - rows[0].map) < 1e-3  # float = float
    out = capsys.readouterr().out
    assert "| onnx | int8 | best-int8.onnx |" in out and out.count("\n| ") == 4  # one row per file
