"""DistributedDataParallel on CPU: `torchrun --nproc_per_node 2 train.py` with gloo, one epoch, tiny data."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.train_helpers import tiny_yaml
from models.checkpoint import load_checkpoint, model_from_checkpoint
from utils.data import load_hyp
from utils.data.synthetic import make_synthetic_dataset
from utils.train.results import read_results

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_torchrun_two_cpu_processes(tmp_path):
    data = make_synthetic_dataset(tmp_path / "ds", n_train=8, n_val=4, imgsz=64, seed=5)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_yaml()))
    hyp = tmp_path / "hyp.yaml"
    hyp.write_text(yaml.safe_dump(load_hyp() | {"nbs": 8}))  # nominal batch 8: one optimizer step per batch
    torchrun = shutil.which("torchrun")
    launcher = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    cmd = [*launcher, "--standalone", "--nproc_per_node", "2", str(REPO / "train.py"), "--data", str(data),
           "--cfg", str(cfg), "--hyp", str(hyp), "--imgsz", "64", "--batch-size", "8", "--epochs", "1", "--workers", "0",
           "--device", "cpu", "--project", str(tmp_path / "runs"), "--noplots"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    log = res.stdout[-4000:] + res.stderr[-4000:]
    assert res.returncode == 0, log
    runs = list((tmp_path / "runs").iterdir())
    assert [p.name for p in runs] == ["exp"], log  # only rank 0 made a run folder
    ck = load_checkpoint(runs[0] / "weights" / "last.pt")
    assert ck["epoch"] == 0 and ck["args"]["batch_size"] == 8
    assert ck["updates"] == 1  # 8 images, batch 8 split over 2 ranks (4 each): one step in the epoch
    assert not any(k.startswith("module.") for k in ck["model"])  # saved without the DDP wrapper
    model = model_from_checkpoint(ck)
    assert len(model(torch.zeros(1, 3, 64, 64))) == 2
    assert len(read_results(runs[0] / "results.csv")) == 1
    assert res.stdout.count("Results saved to") == 1  # rank 1 printed no summary
