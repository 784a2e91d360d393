"""benchmarks/latency.py and benchmarks/onnx_layout.py: interleaved timing rounds, paired ratios, block order,
and the per-change ONNX Runtime benchmark."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_interleaved_medians_time_blocks_in_rounds():
    from benchmarks.latency import interleaved_medians

    order = []
    fns = {k: (lambda k=k: order.append(k)) for k in ("a", "b")}
    out = interleaved_medians(fns, runs=3, warmup=1, block=2, rewarm=0)
    assert order == ["a", "b"] + ["a", "a", "b", "b"] * 2  # warm-up, then 2 rounds of 2-call blocks
    assert set(out) == {"a", "b"} and all(v >= 0 for v in out.values())
    order.clear()
    interleaved_medians(fns, runs=2, warmup=0, block=1, rewarm=0)  # block 1: plain round-robin
    assert order == ["a", "b", "a", "b"]


def test_interleaved_rounds_rewarm_calls_are_not_timed(monkeypatch):
    from benchmarks import latency

    calls = {"a": 0}

    def fn():
        calls["a"] += 1

    clock = iter(float(i) for i in range(10_000))
    monkeypatch.setattr(latency.time, "perf_counter", lambda: next(clock))
    rounds = latency.interleaved_rounds({"a": fn}, runs=4, warmup=0, block=2, rewarm=1)
    assert calls["a"] == 2 * (1 + 2)  # 2 rounds of 1 untimed + 2 timed calls
    assert [len(r) for r in rounds["a"]] == [2, 2]


def test_paired_ratio_pairs_rounds_and_reports_spread():
    from benchmarks.latency import paired_ratio

    small = [[5.0, 5.0], [10.0, 10.0], [6.0, 6.0], [5.5, 5.5]]  # a slow spell in round 2 hits both
    nano = [[10.0, 10.0], [20.0, 20.0], [10.0, 10.0], [10.0, 10.0]]
    med, lo, hi = paired_ratio(small, nano)
    assert med == pytest.approx(0.525) and lo == pytest.approx(0.5) and hi == pytest.approx(0.5625)
    assert paired_ratio([[3.0]], [[6.0]]) == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="same"):
        paired_ratio(small, nano[:2])


def test_latency_blocks_run_format_by_format_with_the_paired_models_adjacent():
    from benchmarks.latency import _block_order

    stems = ["mobilenetv3-large-yolo", "mobilenetv3-small-yolo", "shufflenetv2-yolo", "yolov5n"]
    keys = [f"{s}|{f}" for s in stems for f in ("pt", "ptc", "onnx")]
    order = sorted(keys, key=lambda k: _block_order(k, ("mobilenetv3-small-yolo", "yolov5n"), stems))
    assert order[:4] == ["mobilenetv3-small-yolo|pt", "yolov5n|pt", "mobilenetv3-large-yolo|pt", "shufflenetv2-yolo|pt"]
    assert [k.split("|")[1] for k in order] == ["pt"] * 4 + ["ptc"] * 4 + ["onnx"] * 4
    assert order[8:10] == ["mobilenetv3-small-yolo|onnx", "yolov5n|onnx"]
    # without a pair the models keep their given order within each format
    assert sorted(keys, key=lambda k: _block_order(k, (), stems))[:4] == [f"{s}|pt" for s in stems]


@pytest.mark.slow
def test_onnx_layout_benchmark_times_every_pass(capsys):
    from benchmarks import onnx_layout
    from utils.export.graph import LAYOUT_PASSES

    cfgs = [str(ROOT / "models/mobilenetv3-small-yolo.yaml"), str(ROOT / "models/yolov5n.yaml")]
    res = onnx_layout.run(cfgs, imgsz=64, runs=1, threads=1)
    labels = ["plain", *(f"+ {p}" for p in LAYOUT_PASSES), "+ planes decode"]
    assert set(res["ms"]) == {(Path(c).stem, lab) for c in cfgs for lab in labels}
    assert all(ms > 0 for ms in res["ms"].values()) and set(res["ratio"]) == set(labels)
    assert max(res["max_diff"].values()) < 1e-4  # every pass keeps the plain graph's outputs
    out = capsys.readouterr().out
    assert "| + sigmoid_first |" in out and "| + planes decode |" in out and "mobilenetv3-small-yolo / yolov5n" in out
    with pytest.raises(SystemExit):
        onnx_layout.main(["--imgsz", "100"])
