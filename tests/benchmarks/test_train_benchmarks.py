"""The training benchmarks (benchmarks/train_speed.py, train_profile.py, train_kernels.py): cheap runs on tiny
models and fake clocks; their figures are never asserted, only that they are produced and combined right."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.backend_helpers import TINY


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


@pytest.mark.slow
def test_train_speed_with_frozen_rows(tiny_yaml, capsys):
    from benchmarks import train_speed

    rows = train_speed.run([str(tiny_yaml)], imgsz=64, batch=2, steps=1, warmup=0, threads=1, freeze=2)
    assert len(rows) == 1 and rows[0]["img_s"] > 0
    assert "rows 0-1 frozen" in capsys.readouterr().out
    # every parameter frozen leaves nothing to train: the subprocess fails and the row is left out
    assert train_speed.run([str(tiny_yaml)], imgsz=64, batch=2, steps=1, warmup=0, threads=1, freeze=99) == []


def test_train_speed_paired_ratio(tiny_yaml, tmp_path, monkeypatch):
    """Two models in one process, steps in turn: the median of the per-pair ratios, with its spread."""
    from benchmarks import train_speed

    wide = tmp_path / "wide-yolo.yaml"
    wide.write_text(yaml.safe_dump({**TINY, "width_multiple": 2.0}))
    res = train_speed.paired(str(tiny_yaml), str(wide), imgsz=64, batch=2, steps=1, warmup=0, threads=1)
    assert res["pairs"] == 1 and set(res["img_s"]) == {"tiny-yolo.yaml", "wide-yolo.yaml"}  # real steps run
    # the arithmetic, on a fake clock: step costs per model (1 warm-up, then 3 timed steps)
    clock = [0.0]
    cost = {"a.yaml": [9.0, 0.1, 0.2, 0.1], "b.yaml": [9.0, 0.3, 0.4, 0.2]}

    def step(cfg, imgsz, batch):
        costs = iter(cost[Path(cfg).name])
        return None, lambda: clock.__setitem__(0, clock[0] + next(costs))
    monkeypatch.setattr(train_speed, "training_step", step)
    monkeypatch.setattr(train_speed.time, "perf_counter", lambda: clock[0])
    res = train_speed.paired("a.yaml", "b.yaml", imgsz=64, batch=2, steps=3, warmup=1, threads=1)
    monkeypatch.undo()
    assert res["pairs"] == 3 and res["ratio"] == pytest.approx(2.0)  # pairs' ratios 3, 2, 2
    assert res["iqr"][0] <= res["ratio"] <= res["iqr"][1]
    assert res["img_s"] == pytest.approx({"a.yaml": 2 / 0.1, "b.yaml": 2 / 0.3})  # batch / median step


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


def test_train_speed_benchmark_measures_tiny_model(tmp_path):
    from benchmarks import train_speed
    from tests.train_helpers import tiny_yaml

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_yaml()))
    r = train_speed.measure(str(cfg), imgsz=64, batch=2, steps=1, warmup=0)
    assert r["cfg"] == "tiny.yaml" and r["img_s"] > 0 and r["peak_rss_mb"] > 50 and 0.01 < r["params"] < 1
    assert train_speed.is_detector_yaml(cfg)
    cls = tmp_path / "cls.yaml"
    cls.write_text(yaml.safe_dump({"nc": 2, "backbone": [[-1, 1, "Conv", [8, 3, 2]]],
                                   "head": [[-1, 1, "Classify", ["nc"]]]}))
    assert not train_speed.is_detector_yaml(cls)


def test_train_speed_rounds_pool_step_times(monkeypatch, capsys):
    """Each round measures every model in turn; a row's figure is the median of all its steps."""
    import json
    import subprocess

    from benchmarks import train_speed

    calls = []
    steps = {"a.yaml": [[100.0, 110.0], [300.0, 120.0]], "b.yaml": [[200.0, 210.0], [190.0, 205.0]]}

    def fake_run(cmd, capture_output, text):
        cfg = cmd[cmd.index("--one") + 1]
        calls.append(cfg)
        times = steps[cfg].pop(0)
        row = {"cfg": cfg, "params": 1.0, "img_s": 0.0, "step_ms": 0.0, "peak_rss_mb": 100.0 + len(calls),
               "batch": 4, "steps_ms": times}
        return subprocess.CompletedProcess(cmd, 0, json.dumps(row) + "\n", "")

    monkeypatch.setattr(train_speed.subprocess, "run", fake_run)
    rows = {r["cfg"]: r for r in train_speed.run(["a.yaml", "b.yaml"], batch=4, steps=2, rounds=2)}
    assert calls == ["a.yaml", "b.yaml", "a.yaml", "b.yaml"]  # models in turn, round after round
    assert rows["a.yaml"]["step_ms"] == 120.0  # median of 100, 110, 300, 120 (upper middle)
    assert rows["a.yaml"]["img_s"] == 4 / 120.0 * 1e3
    assert rows["b.yaml"]["peak_rss_mb"] == 104.0  # the highest of its rounds
    assert "| a.yaml |" in capsys.readouterr().out
