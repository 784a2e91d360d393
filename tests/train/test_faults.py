"""Faults during training (docs/RELIABILITY.md, "Faults during training"): Ctrl-C, a full disk, non-finite
losses. A read-only --project, two runs in one folder and a moved data YAML: test_fault_files.py.

SIGKILL at any point is tests/train/test_resume.py::test_sigkill_mid_epoch_and_mid_save_then_resume.
A stale or corrupt labels/*.cache is tested with the data pipeline (tests/data/).
"""
from __future__ import annotations

import errno
import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch
import yaml

import train
from models.checkpoint import load_checkpoint, save_checkpoint
from tests.train.fault_helpers import make_files, tmp_files, train_argv, train_cli
from utils.train import faults
from utils.train.config import TrainConfig, write_yaml
from utils.train.files import DiskFullError, atomic_write_text
from utils.train.results import read_results

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_files(tmp_path_factory.mktemp("faults"))


# ---- Ctrl-C ------------------------------------------------------------------------------------------

# train.py's command line with a hook: at epoch 2 (index 1), batch 1 it writes a marker and waits until the
# test has sent SIGINT to the whole process group (as a terminal's Ctrl-C does, DataLoader workers included).
CHILD = r'''
import sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
import train
from utils.core.errors import cli_main
marker, sent, argv = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]

def on_batch(epoch, i):
    if epoch == 1 and i == 0:
        marker.write_text("x")
        t0 = time.time()
        while not sent.exists() and time.time() - t0 < 120:
            time.sleep(0.02)

sys.exit(cli_main("train.py", lambda a: train.run(train.parse_opt(a), callbacks={{"on_train_batch_end": on_batch}}), argv))
'''


@pytest.mark.slow
def test_ctrl_c_saves_a_resumable_last_pt_and_resume_finishes(files, tmp_path):
    child = tmp_path / "child.py"
    child.write_text(CHILD.format(repo=str(REPO)))
    marker, sent = tmp_path / "marker", tmp_path / "sent"
    argv = train_argv(files, tmp_path / "runs", 3)
    argv[argv.index("--workers") + 1] = "1"  # a forked worker gets the SIGINT too
    proc = subprocess.Popen([sys.executable, str(child), str(marker), str(sent), *argv], cwd=tmp_path, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    t0 = time.time()
    while not marker.exists():
        if proc.poll() is not None or time.time() - t0 > 150:
            proc.kill()
            pytest.fail(f"the interrupt point was not reached:\n{proc.communicate()[1][-3000:]}")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole foreground group
    sent.write_text("x")
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    run_dir = tmp_path / "runs" / "exp"
    last = run_dir / "weights" / "last.pt"
    assert "Interrupted (Ctrl-C) in epoch 2/3 after batch 1/2" in err
    assert f"Resume with: python train.py --resume {last}" in err and "train.py: interrupted" in err
    assert "Traceback" not in err
    ck = load_checkpoint(last)
    # the finished epoch 1 is kept; the interrupted epoch 2 is redone, its one step stays in the weights
    assert ck["epoch"] == 0 and ck["optimizer"] is not None and ck["updates"] == 3
    assert [r["epoch"] for r in read_results(run_dir / "results.csv")] == [0]
    assert not tmp_files(run_dir)

    # the data YAML moved: the resume names the missing file and how to point at it, and changes nothing;
    # with --data it finishes the run (in this process: the command line without another torch start-up)
    data = Path(files[1])
    moved = data.with_name("moved.yaml")
    data.rename(moved)
    try:
        rc, _out, err = train_cli(["--resume", str(last)])
        assert rc == 2, err[-2000:]
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("train.py: error: --resume ")
        assert str(data) in lines[0] and "is missing" in lines[0] and "--data NEW.yaml" in lines[0]
        assert load_checkpoint(last)["updates"] == 3
        rc, out, err = train_cli(["--resume", str(last), "--data", str(moved)])
    finally:
        moved.rename(data)
    assert rc == 0, out[-2000:] + err[-2000:]
    assert "from epoch 2/3" in out and "replaced by --data" in out
    ck = load_checkpoint(last)
    assert ck["epoch"] == 2 and ck["updates"] == 3 + 2 * 2 and ck["args"]["data"] == str(moved)
    assert [r["epoch"] for r in read_results(run_dir / "results.csv")] == [0, 1, 2]


def test_stop_request_turns_the_first_sigint_into_a_flag():
    prev = signal.getsignal(signal.SIGINT)
    with faults.StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs at the next bytecode boundary
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C stops at once
            time.sleep(0.5)
    assert signal.getsignal(signal.SIGINT) is prev
    box: list = []
    t = threading.Thread(target=lambda: box.append(faults.StopRequest().__enter__()))  # no handler off the main thread
    t.start()
    t.join()
    assert box[0].enabled is False and signal.getsignal(signal.SIGINT) is prev


# ---- a full disk ----------------------------------------------------------------------------------------

def _full_disk_save(after_bytes: int = 100):
    """A torch.save that writes `after_bytes` bytes and then fails as a full disk does."""
    real = torch.save

    def save(obj, f, *a, **k):
        buf = io.BytesIO()
        real(obj, buf, *a, **k)
        f.write(buf.getvalue()[:after_bytes])
        raise OSError(errno.ENOSPC, "No space left on device")
    return save


def test_disk_full_while_writing_a_checkpoint_keeps_the_old_one(tmp_path, monkeypatch):
    last = tmp_path / "weights" / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}, "yaml": {}, "names": ["a"], "epoch": 4}, last)
    monkeypatch.setattr(torch, "save", _full_disk_save())
    with pytest.raises(DiskFullError, match=r"no space left on device while writing .*last\.pt; last\.pt from before "
                                            r"is kept; free some space, then: python train.py --resume .*last\.pt"):
        faults.write_checkpoint({"model": {}, "yaml": {}, "names": ["a"], "epoch": 5}, last, resume_from=last)
    monkeypatch.undo()
    assert load_checkpoint(last)["epoch"] == 4 and not tmp_files(tmp_path)
    # the small files of a run: same rule
    (tmp_path / "args.yaml").write_text("a: 1\n")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(yaml, "safe_dump", lambda *a, **k: "a: 2\n")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(DiskFullError, match="args.yaml"):
        write_yaml(tmp_path / "args.yaml", {"a": 2})
    assert (tmp_path / "args.yaml").read_text() == "a: 1\n" and not tmp_files(tmp_path)
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError, match="I/O error") as e:  # other errors are not disk-full errors
        atomic_write_text(tmp_path / "args.yaml", "b: 3\n")
    assert not isinstance(e.value, DiskFullError) and not tmp_files(tmp_path)


def test_disk_full_during_training_stops_with_one_line_and_keeps_last_pt(files, tmp_path, monkeypatch):
    state = {}
    real = torch.save
    full = _full_disk_save(1000)
    monkeypatch.setattr(torch, "save", lambda *a, **k: (full if state.get("epoch") == 1 else real)(*a, **k))
    rc, _out, err = train_cli(train_argv(files, tmp_path / "runs", 3),
                         {"on_train_batch_end": lambda epoch, i: state.update(epoch=epoch)})
    last = tmp_path / "runs" / "exp" / "weights" / "last.pt"
    assert rc == 2
    lines = err.strip().splitlines()
    assert lines[-1] == (f"train.py: error: no space left on device while writing {last}; last.pt from before is "
                         f"kept; free some space, then: python train.py --resume {last}")
    monkeypatch.undo()
    ck = load_checkpoint(last)
    assert ck["epoch"] == 0 and ck["optimizer"] is not None  # epoch 1's, resumable
    assert not tmp_files(tmp_path / "runs")


def test_disk_full_in_any_other_write_is_one_line(files, tmp_path, monkeypatch):
    """A write outside utils/train/files.py (here the results plot) that meets a full disk: one line too."""
    def full(csv_path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(csv_path).with_name("results.png")))
    monkeypatch.setattr(train, "plot_results", full)
    rc, _out, err = train_cli(train_argv(files, tmp_path / "runs", 1))
    png = tmp_path / "runs" / "exp" / "results.png"
    assert rc == 2 and err.strip().splitlines()[-1] == f"train.py: error: no space left on device while writing {png}"
    assert load_checkpoint(tmp_path / "runs" / "exp" / "weights" / "last.pt")["epoch"] == 0


# ---- non-finite losses ----------------------------------------------------------------------------------

class NaNOnSteps(train.ComputeLoss):
    """The training loss, made NaN (or inf) on chosen training calls (0-based; validation calls run under
    no_grad and are left alone)."""

    bad: ClassVar[set[int]] = set()
    calls: ClassVar[int] = 0

    def __call__(self, maps, targets):
        loss, parts = super().__call__(maps, targets)
        if torch.is_grad_enabled():
            n, type(self).calls = type(self).calls, type(self).calls + 1
            if n in self.bad or (n >= 4 and -1 in self.bad):
                value = float("nan") if n % 2 else float("inf")
                return loss * value, parts * value
        return loss, parts


def test_non_finite_loss_is_skipped_then_stops_the_run(files, tmp_path, monkeypatch):
    """Step 1 NaN (skipped, the run goes on), steps 4 and 5 inf/NaN in a row with --nan-limit 2: stop,
    naming the epoch and batch; last.pt (epoch 2) is kept and the skipped steps reached neither the
    optimizer nor the EMA."""
    monkeypatch.setattr(train, "ComputeLoss", NaNOnSteps)
    NaNOnSteps.bad, NaNOnSteps.calls = {1}, 0  # one bad step: the run finishes and its summary counts it
    rc, out, err = train_cli(train_argv(files, tmp_path / "once", 2))
    assert rc == 0 and "WARNING epoch 1/2 batch 2/2: loss is nan; step skipped" in err
    assert "1 training steps skipped for a non-finite loss or gradient: see the warnings above" in out
    assert load_checkpoint(tmp_path / "once" / "exp" / "weights" / "last.pt")["updates"] == 3

    NaNOnSteps.bad, NaNOnSteps.calls = {1, -1}, 0
    rc, _out, err = train_cli(train_argv(files, tmp_path / "runs", 4, "--nan-limit", "2", "--optimizer", "AdamW"))
    last = tmp_path / "runs" / "exp" / "weights" / "last.pt"
    assert rc == 2, err[-2000:]
    assert "WARNING epoch 1/4 batch 2/2: loss is nan; step skipped" in err
    assert "WARNING epoch 3/4 batch 1/2: loss is inf; step skipped" in err
    assert "WARNING epoch 3/4 batch 2/2: loss is nan; step skipped" in err
    assert err.strip().splitlines()[-1].startswith(
        f"train.py: error: epoch 3/4 batch 2/2: loss not finite for 2 batches in a row (since epoch 3/4 batch 1/2); "
        f"stopped. Last good checkpoint: {last} (epoch 2).")
    ck = load_checkpoint(last)
    assert ck["epoch"] == 1 and ck["updates"] == 3  # steps 0, 2, 3
    assert {int(s["step"]) for s in ck["optimizer"]["state"].values()} == {3}
    assert all(torch.isfinite(v).all() for v in ck["ema"].values() if v.is_floating_point())
    assert TrainConfig(nan_limit=5).nan_limit == 5
    with pytest.raises(ValueError, match="--nan-limit"):
        TrainConfig(nan_limit=0)


def test_non_finite_gradient_skips_the_optimizer_step():
    model = torch.nn.Linear(2, 1)
    before = model.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = SimpleNamespace(n=0, update=lambda m: setattr(ema, "n", ema.n + 1))
    r = SimpleNamespace(model=model, optimizer=opt, scaler=torch.amp.GradScaler("cuda", enabled=False), ema=ema)
    model.weight.grad = torch.tensor([[float("inf"), 1.0]])
    model.bias.grad = torch.zeros(1)
    assert train.optimizer_step(r) is False
    assert torch.equal(model.weight, before) and model.weight.grad is None and ema.n == 0
    model.weight.grad, model.bias.grad = torch.ones(1, 2), torch.zeros(1)
    assert train.optimizer_step(r) is True and not torch.equal(model.weight, before) and ema.n == 1


# ---- a read-only --project ------------------------------------------------------------------------------
