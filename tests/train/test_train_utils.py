"""Small training utilities: dist env, TrainConfig + YAML, results.csv/png and tables."""
from __future__ import annotations

import pytest
import torch

from utils.train.config import TrainConfig, read_yaml, write_yaml
from utils.train.dist import DistInfo, broadcast_flag, dist_from_env, seed_everything
from utils.train.results import (RESULT_COLUMNS, append_results, epoch_desc, epoch_header, plot_results, read_results,
                                 truncate_results)


def test_dist_env_and_single_process_helpers():
    assert dist_from_env({}) == DistInfo(-1, -1, 1)
    info = dist_from_env({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"})
    assert info.distributed and not info.is_main and info.rank == 1
    assert DistInfo(0, 0, 2).is_main
    with pytest.raises(ValueError, match="RANK"):
        dist_from_env({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        dist_from_env({"WORLD_SIZE": "0"})
    assert broadcast_flag(True, DistInfo()) is True
    assert seed_everything(3, rank=2) == 5
    a = torch.rand(3)
    seed_everything(3, rank=2)
    assert torch.equal(a, torch.rand(3))


def test_train_config_round_trip_and_validation(tmp_path):
    cfg = TrainConfig(epochs=3, batch_size=4, hyp_overrides={"mosaic": 0.0}, resume="x/last.pt")
    d = cfg.to_dict()
    p = write_yaml(tmp_path / "args.yaml", d)
    back = TrainConfig.from_dict(read_yaml(p))
    assert back == cfg
    assert TrainConfig.from_dict({**d, "bogus": 1}).epochs == 3  # unknown keys ignored (warned)
    for kw, flag in ((dict(epochs=0), "--epochs"), (dict(batch_size=0), "--batch-size"), (dict(imgsz=8), "--imgsz"),
                     (dict(optimizer="Lion"), "--optimizer"), (dict(cache="gpu"), "--cache"),
                     (dict(label_smoothing=1.5), "--label-smoothing"), (dict(freeze=-1), "--freeze")):
        with pytest.raises(ValueError, match=flag):
            TrainConfig(**kw)
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        read_yaml(bad)


def _row(epoch: int) -> dict:
    return {c: float(epoch) + i / 100 for i, c in enumerate(RESULT_COLUMNS)} | {"epoch": epoch}


def test_results_csv_append_truncate_plot(tmp_path):
    csv_path = tmp_path / "results.csv"
    for e in range(4):
        append_results(csv_path, _row(e))
    lines = csv_path.read_text().splitlines()
    assert lines[0].split(",") == list(RESULT_COLUMNS) and len(lines) == 5
    rows = read_results(csv_path)
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    assert rows[2]["metrics/mAP_0.5"] == pytest.approx(2.06)
    assert truncate_results(csv_path, 2) == 2
    assert [r["epoch"] for r in read_results(csv_path)] == [0, 1]
    for e in range(2, 6):
        append_results(csv_path, _row(e))
    png = plot_results(csv_path)
    assert png.exists() and png.stat().st_size > 10_000
    with pytest.raises(KeyError, match="x/lr0"):
        append_results(csv_path, {k: v for k, v in _row(9).items() if k != "x/lr0"})
    csv_path.write_text(",".join(RESULT_COLUMNS) + "\n0,abc" + ",1" * (len(RESULT_COLUMNS) - 2) + "\n")
    with pytest.raises(ValueError, match="results.csv:2"):
        read_results(csv_path)


def test_console_formatting():
    head = epoch_header()
    for word in ("Epoch", "GPU_mem", "box_loss", "obj_loss", "cls_loss", "Instances", "Size"):
        assert word in head
    desc = epoch_desc(0, 30, "-", [0.1, 0.2, 0.3], 12, 320)
    assert "1/30" in desc and "320" in desc and len(desc) == len(head)
