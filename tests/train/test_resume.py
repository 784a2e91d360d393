"""Crash and resume: SIGKILL in the middle of an epoch and while a checkpoint is being written, then
`python train.py --resume last.pt` must finish the run exactly (epochs, results rows, LR schedule, EMA)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.train_helpers import FAST_HYP, tiny_yaml
from models.checkpoint import CheckpointError, load_checkpoint
from utils.data import load_hyp
from utils.data.synthetic import make_synthetic_dataset
from utils.train.optim import lr_lambda
from utils.train.results import read_results

REPO = Path(__file__).resolve().parents[2]
EPOCHS = 3

# Runs train.main(argv) with a hook that freezes the process at a chosen moment and writes a marker file,
# so the test can SIGKILL it exactly there. mode 'batch': first batch of epoch 1. mode 'save': inside the
# first checkpoint write of this process, after half of the bytes are on disk.
CHILD = r'''
import io, sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
import torch
import train
mode, marker, argv = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]

def freeze():
    marker.write_text("x")
    time.sleep(300)

def on_batch(epoch, i):
    if mode == "batch" and epoch == 1 and i == 0:
        freeze()

if mode == "save":
    real_save = torch.save
    def half_save(obj, f, *a, **k):
        buf = io.BytesIO()
        real_save(obj, buf, *a, **k)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        freeze()
    torch.save = half_save

train.run(train.parse_opt(argv), callbacks={{"on_train_batch_end": on_batch}})
'''


def _run_until_marker(script: Path, mode: str, argv: list[str], tmp: Path) -> None:
    marker = tmp / f"marker_{mode}"
    marker.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), mode, str(marker), *argv], cwd=tmp, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"training exited (rc {proc.returncode}) before the kill point:\n{proc.stdout.read()[-3000:]}")
        if time.time() - t0 > 150:
            proc.kill()
            pytest.fail("kill point not reached within 150 s")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def setup_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    data = make_synthetic_dataset(tmp / "ds", n_train=8, n_val=4, imgsz=64, seed=1)
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(tiny_yaml()))
    hyp = load_hyp() | FAST_HYP
    (tmp / "hyp.yaml").write_text(yaml.safe_dump(hyp))
    (tmp / "child.py").write_text(CHILD.format(repo=str(REPO)))
    argv = ["--data", str(data), "--cfg", str(tmp / "tiny.yaml"), "--hyp", str(tmp / "hyp.yaml"),
            "--imgsz", "64", "--batch-size", "4", "--epochs", str(EPOCHS), "--workers", "0",
            "--project", str(tmp / "runs"), "--name", "exp", "--noplots"]
    return tmp, argv, hyp


@pytest.mark.slow
def test_sigkill_mid_epoch_and_mid_save_then_resume(setup_files):
    tmp, argv, hyp = setup_files
    run_dir = tmp / "runs" / "exp"
    last = run_dir / "weights" / "last.pt"

    _run_until_marker(tmp / "child.py", "batch", argv, tmp)  # killed in epoch 2 (index 1), first batch
    assert load_checkpoint(last)["epoch"] == 0
    assert [r["epoch"] for r in read_results(run_dir / "results.csv")] == [0]

    # Resume, and get killed inside the write of epoch 1's last.pt: the results row of epoch 1 is already
    # in the CSV, a half-written temp file lies in weights/, and last.pt must still be epoch 0's.
    _run_until_marker(tmp / "child.py", "save", ["--resume", str(last)], tmp)
    assert list((run_dir / "weights").glob(".*.tmp")), "the kill should have left a half-written temp file"
    assert load_checkpoint(last)["epoch"] == 0
    assert [r["epoch"] for r in read_results(run_dir / "results.csv")] == [0, 1]

    # Plain CLI resume (no other flag) from another working directory finishes the run in the same folder.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(REPO / "train.py"), "--resume", str(last)], cwd=tmp / "ds",
                         env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "Resuming" in res.stdout and "from epoch 2/3" in res.stdout
    assert sorted(p.name for p in (tmp / "runs").iterdir()) == ["exp"]  # no exp2
    assert not list((run_dir / "weights").glob(".*.tmp"))

    rows = read_results(run_dir / "results.csv")
    assert [r["epoch"] for r in rows] == list(range(EPOCHS))
    lf = lr_lambda(EPOCHS, hyp["lrf"])
    for r in rows:  # the LR schedule continued where it stopped (no warm-up in FAST_HYP)
        assert r["x/lr1"] == pytest.approx(hyp["lr0"] * lf(r["epoch"]), rel=1e-3)
    ck_last, ck_best = load_checkpoint(last), load_checkpoint(run_dir / "weights" / "best.pt")
    assert ck_last["epoch"] == EPOCHS - 1
    assert ck_last["updates"] == EPOCHS * 2  # 8 images / batch 4, one step per batch: EMA count continued
    assert ck_last["optimizer"] is None and ck_best["optimizer"] is None  # finished runs are stripped
    assert 0 <= ck_best["epoch"] < EPOCHS
    for f in ("results.png", "args.yaml", "hyp.yaml"):
        assert (run_dir / f).exists(), f

    # A finished run cannot be resumed; the error names the file.
    res = subprocess.run([sys.executable, str(REPO / "train.py"), "--resume", str(last)], cwd=tmp, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "already finished" in res.stderr and "last.pt" in res.stderr


def test_resume_bad_checkpoint_is_clear_error(tmp_path):
    import train

    bad = tmp_path / "last.pt"
    bad.write_bytes(b"\x80\x02 not a checkpoint")
    with pytest.raises(CheckpointError, match="last.pt"):
        train.run(resume=str(bad))
    sd = tmp_path / "sd.pt"
    torch.save({"model": {}, "yaml": {}, "names": []}, sd)  # a checkpoint without training args
    with pytest.raises(CheckpointError, match="no training args"):
        train.run(resume=str(sd))
    with pytest.raises(FileNotFoundError, match="no last.pt"):
        train.run(resume=True, project=str(tmp_path / "empty"))


def test_resume_keeps_the_runs_args_but_no_accel(tmp_path):
    """--resume takes the run's own recipe from the checkpoint; --no-accel (how this process runs) still holds."""
    from models.checkpoint import save_checkpoint
    from utils.train.config import TrainConfig
    from utils.train.setup import resolve_resume

    last = tmp_path / "exp" / "weights" / "last.pt"
    args = TrainConfig(epochs=5, imgsz=64).to_dict()
    save_checkpoint({"model": {}, "yaml": {}, "names": ["a"], "args": args, "epoch": 1, "optimizer": {}}, last)
    for cli_accel, expect in ((True, True), (False, False)):
        cfg, ckpt = resolve_resume(TrainConfig(resume=str(last), epochs=99, imgsz=320, accel=cli_accel))
        assert (cfg.epochs, cfg.imgsz, cfg.accel) == (5, 64, expect)
        assert cfg.save_dir == str((tmp_path / "exp").resolve()) and ckpt["epoch"] == 1
