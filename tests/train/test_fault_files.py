"""Faults around training's files (docs/RELIABILITY.md, "Faults during training"): a read-only --project,
two runs in one folder, a resume whose data YAML moved."""
from __future__ import annotations

import contextlib
import errno
import io
import os
import threading

import cv2
import pytest

import train
from models.checkpoint import load_checkpoint, save_checkpoint
from tests.train.fault_helpers import make_files, tmp_files, train_argv, train_cli
from utils.train import faults
from utils.train.config import TrainConfig, read_yaml, write_yaml
from utils.train.results import RESULT_COLUMNS, append_results, read_results
from utils.train.setup import resolve_resume


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_files(tmp_path_factory.mktemp("faults"))


# ---- a read-only --project ---------------------------------------------------------------------------

def _no_work(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("the dataset was read before the --project check")
    monkeypatch.setattr(train, "check_dataset", forbidden)


def test_project_under_a_file_fails_before_any_work(files, tmp_path, monkeypatch):
    _no_work(monkeypatch)
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    rc, out, err = train_cli(train_argv(files, blocker / "runs"))
    assert rc == 2 and out == ""
    assert err == f"train.py: error: --project {blocker / 'runs'}: cannot create it, {blocker} is a file\n"


def test_read_only_filesystem_project_fails_before_any_work(files, tmp_path, monkeypatch):
    """As root, chmod cannot make a folder unwritable; a read-only mount (EROFS) stops root too."""
    _no_work(monkeypatch)

    def erofs(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(faults.tempfile, "TemporaryFile", erofs)
    rc, _out, err = train_cli(train_argv(files, tmp_path / "ro" / "runs"))
    assert rc == 2
    assert err == (f"train.py: error: --project {tmp_path / 'ro' / 'runs'}: cannot write there (Read-only file "
                   f"system: {tmp_path}); pass a writable --project\n")
    assert not (tmp_path / "ro").exists()
    last = tmp_path / "exp" / "weights" / "last.pt"  # a resumed run checks its own folder
    save_checkpoint({"model": {}, "yaml": {}, "names": ["a"], "args": TrainConfig(data=str(files[1])).to_dict(),
                     "epoch": 0, "optimizer": {}}, last)
    rc, _out, err = train_cli(["--resume", str(last)])
    assert rc == 2 and err.startswith(f"train.py: error: run folder {last.parent.resolve()}: cannot write there "
                                      f"(Read-only file system") and "copy the run folder" in err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into 0o555 folders")
def test_chmod_read_only_project_fails_before_any_work(files, tmp_path, monkeypatch):
    _no_work(monkeypatch)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        rc, _out, err = train_cli(train_argv(files, ro))
    finally:
        ro.chmod(0o755)
    assert rc == 2 and f"--project {ro}: cannot write there (Permission denied" in err


# ---- two runs in one folder -----------------------------------------------------------------------------

def test_concurrent_writers_never_leave_a_mixed_file(tmp_path):
    """Two writers replacing the same files while a reader reads them: every read parses whole."""
    csv_path, y = tmp_path / "results.csv", tmp_path / "args.yaml"
    row = dict.fromkeys(RESULT_COLUMNS, 1.0)
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            for i in range(30):
                append_results(csv_path, row | {"epoch": i})
                write_yaml(y, {"writer": k, "i": i, "pad": "x" * 5000})
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    reads = 0
    while any(t.is_alive() for t in threads):
        if y.exists():
            d = read_yaml(y)
            assert set(d) == {"writer", "i", "pad"} and len(d["pad"]) == 5000
        if csv_path.exists():
            assert all(len(r) == len(RESULT_COLUMNS) for r in read_results(csv_path))
        reads += 1
    for t in threads:
        t.join()
    assert not errors and reads > 0
    assert 30 <= len(read_results(csv_path)) <= 60 and not tmp_files(tmp_path)


@pytest.mark.slow
def test_two_runs_with_the_same_name_and_exist_ok(files, tmp_path):
    """Two runs at once (threads: the file writes race as between processes, without two torch start-ups)."""
    # --noplots: the data and validation plots are written by utils/data and utils/eval, not atomically yet
    argv = train_argv(files, tmp_path / "runs", 2, "--exist-ok")
    results: list = []

    def one(seed: int) -> None:
        try:
            results.append(train.run(train.parse_opt([*argv, "--seed", str(seed)])))
        except BaseException as e:  # noqa: BLE001 - reported below
            results.append(e)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(2)]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert all(isinstance(r, dict) and r["epochs_done"] == 2 for r in results), results
    run_dir = tmp_path / "runs" / "exp"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["exp"]
    rows = read_results(run_dir / "results.csv")
    assert 2 <= len(rows) <= 4 and all(set(RESULT_COLUMNS) <= set(r) for r in rows)
    for name in ("args.yaml", "hyp.yaml"):
        assert isinstance(read_yaml(run_dir / name), dict)
    for name in ("last.pt", "best.pt"):
        assert load_checkpoint(run_dir / "weights" / name)["epoch"] in (0, 1)
    assert cv2.imread(str(run_dir / "results.png")) is not None
    assert not tmp_files(run_dir)


# ---- a resume whose data YAML moved (fast form; the slow Ctrl-C test resumes one end to end) ---------------

def test_resume_with_a_moved_data_yaml_names_it_and_takes_data(tmp_path):
    last = tmp_path / "exp" / "weights" / "last.pt"
    gone = tmp_path / "old" / "data.yaml"
    args = TrainConfig(data=str(gone), epochs=5).to_dict()
    save_checkpoint({"model": {}, "yaml": {}, "names": ["a"], "args": args, "epoch": 1, "optimizer": {}}, last)
    with pytest.raises(FileNotFoundError, match=r"the run's data YAML .*old/data\.yaml is missing .*"
                                                r"python train.py --resume .*last\.pt --data NEW\.yaml"):
        resolve_resume(TrainConfig(resume=str(last)))
    new = tmp_path / "new.yaml"
    new.write_text("path: x\n")
    cfg, _ = resolve_resume(train.parse_opt(["--resume", str(last), "--data", str(new)]))
    assert cfg.data == str(new.resolve()) and cfg.resume_data == "" and cfg.epochs == 5
    with pytest.raises(FileNotFoundError, match="--data .*nope.yaml: file not found"):
        resolve_resume(TrainConfig(resume=str(last), resume_data=str(tmp_path / "nope.yaml")))
    assert train.parse_opt(["--data", str(new)]).resume_data == ""  # --data alone is a new run's data
