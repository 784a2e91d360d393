"""Shared by the training-fault tests (test_faults.py, test_fault_files.py): tiny data and train.py's CLI."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import yaml

import train
from tests.train_helpers import FAST_HYP, tiny_yaml
from utils.core.errors import cli_main
from utils.data import load_hyp
from utils.data.synthetic import make_synthetic_dataset


def make_files(tmp: Path) -> tuple[Path, Path, Path, Path]:
    """(tmp, data yaml, model yaml, hyp yaml): 8 train / 4 val images of 64 px, 2 batches of 4 per epoch."""
    data = make_synthetic_dataset(tmp / "ds", n_train=8, n_val=4, imgsz=64, seed=5)
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(tiny_yaml()))
    (tmp / "hyp.yaml").write_text(yaml.safe_dump(load_hyp() | FAST_HYP))
    return tmp, data, tmp / "tiny.yaml", tmp / "hyp.yaml"


def train_argv(files, project: Path, epochs: int = 2, *extra: str) -> list[str]:
    """train.py arguments for `files` (from `make_files`) writing to `project`/exp."""
    _, data, cfg, hyp = files
    return ["--data", str(data), "--cfg", str(cfg), "--hyp", str(hyp), "--imgsz", "64", "--batch-size", "4",
            "--epochs", str(epochs), "--workers", "0", "--project", str(project), "--name", "exp", "--noplots",
            *extra]


def train_cli(argv: list[str], callbacks: dict | None = None) -> tuple[int, str, str]:
    """train.py's command line in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli_main("train.py", lambda a: train.run(train.parse_opt(a), callbacks=callbacks), argv)
    return rc, out.getvalue(), err.getvalue()


def tmp_files(folder: Path) -> list[Path]:
    """Temp files an atomic write left behind under `folder`."""
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]
