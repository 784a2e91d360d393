"""benchmarks/run.py and its helpers: a cheap smoke run on a tiny model (figures are never asserted)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import detect
from benchmarks import detect_path, machine
from benchmarks import run as bench
from tests.backend_helpers import TINY, make_images
from utils.infer import backend

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def tiny_yaml(tmp_path):
    f = tmp_path / "tiny-yolo.yaml"
    f.write_text(yaml.safe_dump(TINY))
    return f


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
    assert text.count("not measured in this run") == 4
    assert "detect.py path (pt)" in text and "- cpu: " in text and "- load: " in text


def test_targets_are_marked_met_or_missed():
    rep = bench.Report(machine={}, sizes=[320], runs=1, threads=1)
    rep.rows = [{"cfg": "yolov5n", "pt": {320: 10.0}, "ptc": {320: 10.0}, "onnx": {320: 10.0},
                 "train": {"img_s": 10.0}},
                {"cfg": "mobilenetv3-small-yolo", "pt": {320: 7.0}, "ptc": {320: 5.5}, "onnx": {320: 4.0},
                 "train": {"img_s": 25.0}}]
    lines = bench.target_lines(rep)
    assert "0.40x" in lines[0] and lines[0].endswith("met")  # ORT 4 / 10 <= 0.5
    assert "0.70x" in lines[1] and lines[1].endswith("MISSED")  # PyTorch 7 / 10 > 0.6
    assert "0.55x" in lines[2] and "--compile" in lines[2] and lines[2].endswith("met")  # compiled 5.5 / 10
    assert "2.50x" in lines[3] and lines[3].endswith("met")  # training 25 / 10 >= 2
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


def test_to_tensor_matches_the_reference_conversion_and_is_channels_last():
    img = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    x = detect.to_tensor(img)
    ref = torch.from_numpy(np.ascontiguousarray(img[..., ::-1].transpose(2, 0, 1))).float().div(255)[None]
    assert x.shape == (1, 3, 64, 96) and x.dtype == torch.float32 and torch.equal(x, ref)
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_tune_malloc_honours_the_opt_out(monkeypatch):
    monkeypatch.setattr(backend, "_malloc_tuned", False)
    monkeypatch.setenv("MOBILEYOLO_MALLOC_TUNE", "0")
    assert backend.tune_malloc() is False and backend._malloc_tuned is False


def test_machine_description_says_why_kernels_are_off(monkeypatch):
    from utils.accel import native

    monkeypatch.setenv("MOBILEYOLO_CPU_KERNELS", "0")
    native.reset()
    try:
        assert machine.cpu_kernels().count("unavailable (disabled by MOBILEYOLO_CPU_KERNELS=0)") == 2
    finally:
        native.reset()


def test_machine_description_has_the_facts():
    info = machine.describe()
    assert {"cpu", "cores", "torch", "onnxruntime", "opencv", "load", "malloc", "cpu_kernels"} <= set(info)
    assert info["cpu"] and int(info["cores"].split()[0]) >= 1
    assert "train " in info["cpu_kernels"] and "infer " in info["cpu_kernels"]
    assert machine.markdown({"a": "b"}) == "- a: b"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt only")
def test_tune_malloc_applies_once_on_glibc():
    # a fresh interpreter: the setting is process-wide and must not leak into the test process
    code = ("import os; [os.environ.pop(k, None) for k in ('MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_', "
            "'MOBILEYOLO_MALLOC_TUNE')]; from utils.infer.backend import tune_malloc; print(tune_malloc(), tune_malloc())")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "MOBILEYOLO_MALLOC_TUNE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]


def test_idle_cores_follows_the_load_average(monkeypatch):
    """Where /proc/stat cannot be sampled, the 1-minute load average decides."""
    from utils.infer import cpu

    monkeypatch.setattr(cpu, "idle_cpus", lambda seconds=0.1: None)
    monkeypatch.setattr(cpu, "_IDLE_CACHE", {})
    cores = backend.physical_cores()
    monkeypatch.setattr(backend.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert backend.idle_cores(max_age=0.0) == cores
    monkeypatch.setattr(backend.os, "getloadavg", lambda: (cores + 3.0, 0.0, 0.0))
    assert backend.idle_cores(max_age=0.0) == 1

    def no_load() -> tuple[float, float, float]:
        raise OSError("no load average here")
    monkeypatch.setattr(backend.os, "getloadavg", no_load)
    assert backend.idle_cores(max_age=0.0) == cores


def test_busy_machine_lowers_torch_threads_and_stops_ort_spinning(tmp_path, monkeypatch):
    import export
    from tests.backend_helpers import make_checkpoint

    pt = make_checkpoint(tmp_path / "tiny.pt", imgsz=64)
    onnx_file = export.run(pt, ("onnx",), imgsz=64, outdir=tmp_path, threads=1)["onnx"]
    monkeypatch.setattr(backend, "idle_cores", lambda: 1)
    torch.set_num_threads(2)  # the module fixture restores the caller's setting afterwards
    backend.DetectBackend(pt)
    assert torch.get_num_threads() == 1
    backend.DetectBackend(pt, threads=2)  # an explicit request is honoured
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)
    opts = backend.DetectBackend(onnx_file, threads=2).session.get_session_options()
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    monkeypatch.setattr(backend, "idle_cores", lambda: 64)
    opts = backend.DetectBackend(onnx_file, threads=2).session.get_session_options()
    assert opts.intra_op_num_threads == 2
    with pytest.raises(RuntimeError):  # never set: ORT's default (spin) applies
        opts.get_session_config_entry("session.intra_op.allow_spinning")
    # ... but the threads stop spinning when a run ends, so they leave the cores to NMS and drawing
    assert opts.get_session_config_entry("session.force_spinning_stop") == "1"


def test_omp_policy_follows_the_load(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    from utils.infer import cpu

    monkeypatch.setattr(cpu, "usable_cores", lambda: 2)
    monkeypatch.setattr(cpu, "idle_cpus", lambda seconds=0.5: None)  # no /proc/stat: load average
    monkeypatch.setattr(cpu.os, "getloadavg", lambda: (0.2, 0.2, 0.2))
    bench.set_omp_policy("auto", 2)
    assert "OMP_WAIT_POLICY" not in os.environ  # idle: keep libgomp's spinning
    monkeypatch.setattr(cpu.os, "getloadavg", lambda: (3.0, 3.0, 3.0))
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
    from utils.infer import cpu

    monkeypatch.setattr(cpu.os, "getloadavg", lambda: (1.4, 1.0, 0.5))
    monkeypatch.setattr(cpu, "idle_cpus", lambda seconds=0.5: 1.97)
    bench.set_omp_policy("auto", 2)
    assert "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.setattr(cpu, "idle_cpus", lambda seconds=0.5: 0.6)  # another process holds a core
    bench.set_omp_policy("auto", 2)
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"


def test_idle_cpus_reads_proc_stat(monkeypatch):
    """Idle share of the jiffies between two /proc/stat reads, times the usable cores."""
    from utils.infer import cpu

    reads = iter([(100, 400), (150, 500)])  # 50 of 100 jiffies idle
    monkeypatch.setattr(cpu, "cpu_times", lambda: next(reads))
    monkeypatch.setattr(cpu, "usable_cores", lambda: 2)
    assert cpu.idle_cpus(0.0) == pytest.approx(1.0)
    monkeypatch.setattr(cpu, "cpu_times", lambda: None)
    assert cpu.idle_cpus(0.0) is None
    monkeypatch.undo()
    if Path("/proc/stat").exists():  # the real file: a share of this machine's cores
        assert 0.0 <= cpu.idle_cpus(0.05) <= cpu.usable_cores()


def test_idle_cores_prefers_a_fresh_sample_to_the_lagging_load_average(monkeypatch):
    from utils.infer import cpu

    samples = []

    def sample(seconds=0.1):
        samples.append(seconds)
        return 1.9  # the other core is idle too

    monkeypatch.setattr(cpu, "physical_cores", lambda: 2)
    monkeypatch.setattr(cpu, "idle_cpus", sample)
    monkeypatch.setattr(cpu, "_IDLE_CACHE", {})
    monkeypatch.setattr(cpu.os, "getloadavg", lambda: (1.4, 1.0, 0.5))  # a finished job's echo
    assert cpu.idle_cores() == 2 and cpu.idle_cores() == 2
    assert len(samples) == 1  # the second call reused the sample (max_age)
    assert cpu.idle_cores(max_age=0.0) == 2 and len(samples) == 2
    monkeypatch.setattr(cpu, "idle_cpus", lambda seconds=0.1: 0.3)  # another process holds both cores
    assert cpu.idle_cores(max_age=0.0) == 1


def test_targets_use_paired_rounds_when_present():
    rounds = {(bench.SMALL, "onnx", 320): [[4.0]] * 3, (bench.NANO, "onnx", 320): [[10.0]] * 3,
              (bench.SMALL, "pt", 320): [[7.0]] * 3, (bench.NANO, "pt", 320): [[10.0]] * 3}
    rows = [{"cfg": bench.SMALL, "pt": {320: 7.0}, "onnx": {320: 4.0}, "train": None},
            {"cfg": bench.NANO, "pt": {320: 10.0}, "onnx": {320: 10.0}, "train": None}]
    rep = bench.Report({}, [320], 3, 2, rows=rows, rounds=rounds)
    lines = bench.target_lines(rep)
    assert "**0.40x**" in lines[0] and "met" in lines[0] and "over 3 rounds" in lines[0]
    assert "**0.70x**" in lines[1] and "MISSED" in lines[1]
    assert "not measured" in lines[2] and "not measured" in lines[3]  # no compiled rows, no training


def test_train_profile_times_every_row(tiny_yaml, capsys):
    from benchmarks import train_profile

    res = train_profile.run(tiny_yaml, imgsz=64, batch=2, steps=1, threads=1)
    n = len(TINY["backbone"]) + len(TINY["head"])
    assert [r[0] for r in res["rows"]] == list(range(n)) and all(r[2] > 0 for r in res["rows"])
    assert res["full"] > 0 and res["loss"] > 0
    out = capsys.readouterr().out
    assert "Detect" in out and "full forward + backward" in out
    with pytest.raises(SystemExit):
        train_profile.main(["--imgsz", "100"])


def test_train_speed_with_frozen_rows(tiny_yaml, capsys):
    from benchmarks import train_speed

    rows = train_speed.run([str(tiny_yaml)], imgsz=64, batch=2, steps=1, warmup=0, threads=1, freeze=2)
    assert len(rows) == 1 and rows[0]["img_s"] > 0
    assert "rows 0-1 frozen" in capsys.readouterr().out
    # every parameter frozen leaves nothing to train: the subprocess fails and the row is left out
    assert train_speed.run([str(tiny_yaml)], imgsz=64, batch=2, steps=1, warmup=0, threads=1, freeze=99) == []


def test_train_speed_paired_ratio(tiny_yaml, tmp_path):
    """Two models in one process, steps in turn: the ratio of their speeds with its spread."""
    from benchmarks import train_speed

    wide = tmp_path / "wide-yolo.yaml"  # the same graph with 4x the channels: clearly slower to train
    wide.write_text(yaml.safe_dump({**TINY, "width_multiple": 4.0}))
    res = train_speed.paired(str(tiny_yaml), str(wide), imgsz=64, batch=2, steps=3, warmup=1, threads=1)
    assert res["pairs"] == 3 and res["iqr"][0] <= res["ratio"] <= res["iqr"][1]
    a, b = res["img_s"]["tiny-yolo.yaml"], res["img_s"]["wide-yolo.yaml"]
    assert a > b > 0 and res["ratio"] > 1  # the small model is the faster one, and the ratio says so


def test_training_target_uses_the_paired_steps():
    rows = [{"cfg": bench.SMALL, "pt": {}, "onnx": {}, "train": {"img_s": 30.0}},
            {"cfg": bench.NANO, "pt": {}, "onnx": {}, "train": {"img_s": 20.0}}]
    rep = bench.Report({}, [320], 1, 2, rows=rows)
    assert "**1.50x**" in bench.target_lines(rep)[3]  # no paired steps: the table's ratio
    rep.train_pair = {"ratio": 2.1, "iqr": (1.9, 2.2), "pairs": 12, "img_s": {}}
    line = bench.target_lines(rep)[3]
    assert "**2.10x**" in line and "IQR 1.90-2.20 over 12 steps" in line and line.endswith("met")
    rep.train_pair["ratio"] = 1.95
    assert bench.target_lines(rep)[3].endswith("MISSED")


def test_train_pair_needs_both_models(tiny_yaml):
    assert bench.train_pair([tiny_yaml], threads=1, steps=1) is None


def test_train_kernels_benchmark_covers_every_kernel(capsys):
    """benchmarks/train_kernels.py: one row per depthwise shape, BN + activation and SE rows, step A/B."""
    import shutil

    from benchmarks import train_kernels
    from utils.accel import native

    if native.compiler() is None or not shutil.which(native.compiler()):
        pytest.skip("no C compiler: the fast path is off")
    res = train_kernels.run("models/mobilenetv3-small-yolo.yaml", imgsz=64, batch=2, steps=1, threads=1)
    ops = [r[0] for r in res["ops"]]
    assert sum(o.startswith("depthwise") for o in ops) >= 9  # Small's 11 depthwise rows, some share a shape
    assert any(o.startswith("BatchNorm + Hardswish") for o in ops) and "squeeze-excite fwd+bwd" in ops
    assert all(t > 0 and o > 0 for _, _, t, o in res["ops"])
    fast, ref, ratio = res["step"]
    assert fast > 0 and ref > 0 and ratio > 0
    out = capsys.readouterr().out
    assert "| op | input | PyTorch | ours |" in out and "training step" in out


def test_infer_kernels_benchmark_covers_every_swapped_layer(capsys):
    """benchmarks/infer_kernels.py: a row per depthwise conv and SE of the model, then the model A/B."""
    import shutil

    from benchmarks import infer_kernels
    from utils.accel import native

    if native.compiler() is None or not shutil.which(native.compiler()):
        pytest.skip("no C compiler: the inference kernels are off")
    res = infer_kernels.run(["models/mobilenetv3-small-yolo.yaml", "models/yolov5n.yaml"], imgsz=64, runs=2,
                            threads=1)
    ops = [r[0] for r in res["ops"]]
    assert sum(o.startswith("depthwise") for o in ops) == 17 and ops.count("squeeze-excite") == 9
    assert all(t > 0 and o > 0 for _, _, t, o in res["ops"])
    m = res["models"]
    assert all(m[f"{s}|{arm}"] > 0 for s in ("mobilenetv3-small-yolo", "yolov5n") for arm in ("on", "off"))
    assert m["mobilenetv3-small-yolo/yolov5n|on"] > 0 and m["mobilenetv3-small-yolo/yolov5n|off"] > 0
    out = capsys.readouterr().out
    assert "| op | input | PyTorch | ours |" in out and "26 layers on our kernels" in out and "latency ratio" in out
