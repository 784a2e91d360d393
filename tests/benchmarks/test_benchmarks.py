"""benchmarks/run.py, latency.py, machine.py, detect_path.py: a smoke run on a tiny model, the targets, the
runtime policy the latency tables apply, the OMP policy (figures are never asserted)."""
from __future__ import annotations

import os

import pytest
import torch
import yaml

from benchmarks import detect_path, machine
from benchmarks import run as bench
from tests.backend_helpers import TINY, make_images
from utils.infer import runtime


@pytest.mark.slow
def test_smoke_run_writes_a_complete_report(tiny_yaml, tmp_path, monkeypatch):
    monkeypatch.setenv("MOBILEYOLO_MALLOC_TUNE", "0")  # keep this pytest process on glibc's defaults
    src = tmp_path / "imgs"
    make_images(src, n=3, size=(96, 72))
    out = tmp_path / "bench.md"
    rep = bench.run([tiny_yaml], sizes=[64], runs=1, threads=1, train_steps=1, out=out, malloc_tune=False,
                    detect_source=src)
    row = rep.rows[0]
    assert row["cfg"] == "tiny-yolo" and row["params"] > 1000 and row["gflops"][64] > 0
    assert row["pt"][64] > 0 and row["onnx"][64] > 0
    assert row["ptc"][64] > 0 and row["compile_s"][64] > 0  # detect.py --compile, compiled before timing
    assert row["train"]["img_s"] > 0 and row["train"]["peak_rss_mb"] > 50  # benchmarks/train_speed.py, subprocess
    assert [d.fmt for d in rep.detect] == ["pt", "pt --compile", "onnx"]
    assert all(d.images == 3 and set(detect_path.STAGES) <= set(d.ms) for d in rep.detect)
    text = out.read_text()
    assert "| tiny-yolo |" in text and "GFLOPs 64" in text and "ORT 64 (ms)" in text
    assert "PyTorch --compile 64 (ms)" in text and "compile (s)" in text
    # the model ratios need both models; with one tiny model they are reported as not measured
    assert text.count("not measured in this run") == len(bench.TARGETS) == 3
    assert "| PyTorch 64 (ms) |" in text  # eager figures are still printed, without a target
    assert "detect.py path (pt)" in text and "- cpu: " in text and "- load: " in text


def test_latency_tables_apply_the_runtime_policy_and_decide_ort_spinning(tiny_yaml, tmp_path, monkeypatch):
    """benchmarks/latency.py applies what detect.py's main() applies (it used to come with DetectBackend)."""
    from benchmarks import latency

    calls = []
    monkeypatch.setattr(runtime, "apply_policy", lambda threads=None, malloc=True: calls.append((threads, malloc)))
    monkeypatch.setattr(runtime, "spin_ok", lambda threads: False)  # a busy machine
    prepared = latency.prepare([tiny_yaml], [64], tmp_path, threads=1)
    spins: set[bool] = set()
    ms = latency.time_all(prepared, [64], runs=1, threads=1, warmup=0, malloc=False, spins=spins, compile=False)
    assert calls == [(1, False)] and torch.get_num_threads() == 1
    assert spins == {False} and set(ms) == {("tiny-yolo", "pt", 64), ("tiny-yolo", "onnx", 64)}
    spins.clear()
    latency.time_all(prepared, [64], runs=1, threads=1, warmup=0, spin=True, spins=spins, compile=False)
    assert spins == {True} and calls[-1] == (1, True)  # an explicit choice wins over spin_ok


def test_targets_are_marked_met_or_missed():
    rep = bench.Report(machine={}, sizes=[320], runs=1, threads=1)
    rep.rows = [{"cfg": "yolov5n", "pt": {320: 10.0}, "ptc": {320: 10.0}, "onnx": {320: 10.0},
                 "train": {"img_s": 10.0}},
                {"cfg": "mobilenetv3-small-yolo", "pt": {320: 7.0}, "ptc": {320: 5.5}, "onnx": {320: 4.0},
                 "train": {"img_s": 25.0}}]
    lines = bench.target_lines(rep)
    assert "0.40x" in lines[0] and lines[0].endswith("met")  # ORT 4 / 10 <= 0.5
    assert "0.55x" in lines[1] and "--compile" in lines[1] and lines[1].endswith("met")  # compiled 5.5 / 10
    assert "2.50x" in lines[2] and lines[2].endswith("met")  # training 25 / 10 >= 2
    # eager PyTorch has no target (issue 18): 7 / 10 is in the table, not judged
    assert len(lines) == 3 and not any("0.70x" in line for line in lines)
    rep.detect = [detect_path.PathResult({s: 1.0 for s in detect_path.STAGES} | {"read": 3.0, "model": 2.0},
                                         1, 0.0, "w.pt", "pt", (320, 320))]
    assert bench.target_lines(rep)[-1].endswith("MISSED") and "`read`" in bench.target_lines(rep)[-1]


def test_detector_yamls_skip_classifiers(tmp_path):
    (tmp_path / "det.yaml").write_text(yaml.safe_dump(TINY))
    (tmp_path / "cls.yaml").write_text(yaml.safe_dump({**TINY, "head": [[-1, 1, "Classify", [2]]]}))
    (tmp_path / "junk.yaml").write_text("just a string")
    assert [p.name for p in bench.detector_yamls(tmp_path)] == ["det.yaml"]
    names = {p.stem for p in bench.detector_yamls()}
    assert {"yolov5n", "mobilenetv3-small-yolo"} <= names and "mobilenetv3-small-cls" not in names


@pytest.mark.parametrize("argv", [["--imgsz", "100"], ["--runs", "0"], ["--threads", "0"]])
def test_bad_arguments_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert "--imgsz" in capsys.readouterr().err


def test_machine_description_says_why_kernels_are_off(monkeypatch):
    from utils.accel import native

    monkeypatch.setenv("MOBILEYOLO_CPU_KERNELS", "0")
    native.reset()
    try:
        assert machine.cpu_kernels().startswith("train unavailable (disabled by MOBILEYOLO_CPU_KERNELS=0)")
    finally:
        native.reset()


def test_machine_description_has_the_facts():
    info = machine.describe()
    assert {"cpu", "cores", "torch", "onnxruntime", "opencv", "load", "malloc", "cpu_kernels"} <= set(info)
    assert info["cpu"] and int(info["cores"].split()[0]) >= 1
    assert info["cpu_kernels"].startswith("train ") and "infer" not in info["cpu_kernels"]
    assert machine.markdown({"a": "b"}) == "- a: b"


def test_omp_policy_follows_the_load(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(runtime, "usable_cores", lambda: 2)
    monkeypatch.setattr(runtime, "idle_cpus", lambda seconds=0.5: None)  # no /proc/stat: load average
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (0.2, 0.2, 0.2))
    bench.set_omp_policy("auto", 2)
    assert "OMP_WAIT_POLICY" not in os.environ  # idle: keep libgomp's spinning
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (3.0, 3.0, 3.0))
    bench.set_omp_policy("active", 2)
    assert "OMP_WAIT_POLICY" not in os.environ
    bench.set_omp_policy("auto", 2)
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's own setting wins
    bench.set_omp_policy("passive", 2)
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_omp_policy_prefers_the_sampled_idle_cpus(monkeypatch):
    """A load average still high from the previous job must not make an idle machine look busy."""
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (1.4, 1.0, 0.5))
    monkeypatch.setattr(runtime, "idle_cpus", lambda seconds=0.5: 1.97)
    bench.set_omp_policy("auto", 2)
    assert "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.setattr(runtime, "idle_cpus", lambda seconds=0.5: 0.6)  # another process holds a core
    bench.set_omp_policy("auto", 2)
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"


def test_targets_use_paired_rounds_when_present():
    rounds = {(bench.SMALL, "onnx", 320): [[4.0]] * 3, (bench.NANO, "onnx", 320): [[10.0]] * 3,
              (bench.SMALL, "pt", 320): [[7.0]] * 3, (bench.NANO, "pt", 320): [[10.0]] * 3}
    rows = [{"cfg": bench.SMALL, "pt": {320: 7.0}, "onnx": {320: 4.0}, "train": None},
            {"cfg": bench.NANO, "pt": {320: 10.0}, "onnx": {320: 10.0}, "train": None}]
    rep = bench.Report({}, [320], 3, 2, rows=rows, rounds=rounds)
    lines = bench.target_lines(rep)
    assert "**0.40x**" in lines[0] and "met" in lines[0] and "over 3 rounds" in lines[0]
    assert "not measured" in lines[1] and "not measured" in lines[2]  # no compiled rows, no training
    assert len(lines) == 3 and not any("0.70" in line for line in lines)  # eager PyTorch: no target


def test_training_target_uses_the_paired_steps():
    rows = [{"cfg": bench.SMALL, "pt": {}, "onnx": {}, "train": {"img_s": 30.0}},
            {"cfg": bench.NANO, "pt": {}, "onnx": {}, "train": {"img_s": 20.0}}]
    rep = bench.Report({}, [320], 1, 2, rows=rows)
    assert "**1.50x**" in bench.target_lines(rep)[2]  # no paired steps: the table's ratio
    rep.train_pair = {"ratio": 2.1, "iqr": (1.9, 2.2), "pairs": 12, "img_s": {}}
    line = bench.target_lines(rep)[2]
    assert "**2.10x**" in line and "IQR 1.90-2.20 over 12 steps" in line and line.endswith("met")
    rep.train_pair["ratio"] = 1.95
    assert bench.target_lines(rep)[2].endswith("MISSED")


def test_train_pair_needs_both_models(tiny_yaml):
    assert bench.train_pair([tiny_yaml], threads=1, steps=1) is None
