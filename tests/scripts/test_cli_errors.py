"""Errors at the command line (issue 18): a user error is one line `<script>: error: <what>`, exit code 2.

Every catalogued case runs twice: in-process through `cli_main` (cheap, in the default run) and as a real
subprocess (`python train.py ...`; ~3 s each on 2 cores, as each starts Python and imports torch, so all
but the two cheapest are marked slow). Both check the exit code, that the last stderr line is
`<script>: error: ...` naming the file or flag, that no traceback is printed and that no run folder was
left behind. Unexpected errors keep their traceback.
"""
from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.backend_helpers import TINY, make_checkpoint, make_images, write_malicious
from utils.core.errors import FlagError, UserError, cli_main
from utils.data.images import read_image
from utils.data.synthetic import make_synthetic_dataset

ROOT = Path(__file__).resolve().parents[2]
MODULES = {"train.py": "train", "val.py": "val", "detect.py": "detect", "export.py": "export",
           "models/yolo.py": "models.yolo", "utils/data/convert.py": "utils.data.convert"}
COMMANDS = {"utils/data/convert.py": ["-m", "utils.data.convert"]}  # run as documented in the README
CHEAP = {"export-weights-missing", "yolo-model-yaml"}  # under 2 s as subprocesses: kept in the default run


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Tiny inputs, good and bad, shared by every case (nothing here trains or runs a model)."""
    tmp = tmp_path_factory.mktemp("cli")
    data = make_synthetic_dataset(tmp / "ds", n_train=2, n_val=2, imgsz=64, nc=2)
    no_val = tmp / "no_val.yaml"
    no_val.write_text(yaml.safe_dump({"path": str(tmp / "ds"), "train": "images/train", "names": ["a", "b"]}))
    for split in ("train", "val"):
        (tmp / "empty" / "images" / split).mkdir(parents=True)
    empty = tmp / "empty.yaml"
    empty.write_text(yaml.safe_dump({"path": str(tmp / "empty"), "train": "images/train", "val": "images/val",
                                     "names": ["a", "b"]}))
    tiny = tmp / "tiny.yaml"
    tiny.write_text(yaml.safe_dump(TINY))
    unknown = tmp / "unknown_module.yaml"
    unknown.write_text(yaml.safe_dump({**TINY, "backbone": [[-1, 1, "Conv", [8, 3, 2]], [-1, 1, "NoSuchBlock", [16]]]}))
    broken = tmp / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    return {"data": data, "no_val": no_val, "empty": empty, "tiny": tiny, "unknown": unknown,
            "weights": make_checkpoint(tmp / "w.pt", imgsz=64),
            "evil": write_malicious(tmp / "evil.pt", tmp / "pwned"), "marker": tmp / "pwned",
            "missing": tmp / "missing.pt", "image": make_images(tmp / "imgs", n=1)[0], "broken": broken,
            "runs": tmp / "runs"}


# (id, script, flags with {placeholders} for `files`, what the error line must contain)
CASES = [
    ("train-data-missing", "train.py", ["--data", "{missing}.yaml"], "missing.pt.yaml"),
    ("train-data-keys", "train.py", ["--data", "{no_val}"], "no_val.yaml: missing required key 'val'"),
    ("train-no-images", "train.py", ["--data", "{empty}", "--cfg", "{tiny}"], "empty/images/train"),
    ("train-model-yaml", "train.py", ["--data", "{data}", "--cfg", "{unknown}"], "unknown_module.yaml: row 1"),
    ("train-unsafe-weights", "train.py", ["--data", "{data}", "--cfg", "{tiny}", "--weights", "{evil}"],
     "evil.pt: not a valid MobileYOLO checkpoint (refused unsafe content"),
    ("train-unsafe-backbone", "train.py", ["--data", "{data}", "--backbone-weights", "{evil}"],
     "evil.pt: not a loadable state_dict"),
    ("train-weights-missing", "train.py", ["--data", "{data}", "--cfg", "{tiny}", "--weights", "{missing}"],
     "missing.pt: checkpoint file not found"),
    ("train-resume-missing", "train.py", ["--resume", "{missing}"], "missing.pt: checkpoint file not found"),
    ("train-flag", "train.py", ["--epochs", "0"], "--epochs must be >= 1"),
    ("train-imgsz", "train.py", ["--data", "{data}", "--cfg", "{tiny}", "--imgsz", "80"], "--imgsz 80"),
    ("val-data-missing", "val.py", ["--data", "{missing}.yaml", "--weights", "{weights}"], "missing.pt.yaml"),
    ("val-data-keys", "val.py", ["--data", "{no_val}", "--weights", "{weights}"], "no_val.yaml: missing required key"),
    ("val-no-test-split", "val.py", ["--data", "{data}", "--weights", "{weights}", "--task", "test"],
     "data.yaml: no 'test' split"),
    ("val-no-images", "val.py", ["--data", "{empty}", "--weights", "{weights}"], "empty/images/val"),
    ("val-unsafe-weights", "val.py", ["--data", "{data}", "--weights", "{evil}"], "evil.pt: not a valid"),
    ("val-weights-missing", "val.py", ["--data", "{data}", "--weights", "{missing}"], "missing.pt: weights file not found"),
    ("val-flag", "val.py", ["--data", "{data}", "--weights", "{weights}", "--conf-thres", "2"], "--conf-thres"),
    ("detect-unsafe-weights", "detect.py", ["--weights", "{evil}", "--source", "{image}"], "evil.pt: not a valid"),
    ("detect-weights-missing", "detect.py", ["--weights", "{missing}", "--source", "{image}"], "missing.pt: weights"),
    ("detect-source", "detect.py", ["--weights", "{weights}", "--source", "{missing}.mp4"],
     "missing.pt.mp4: source not found"),
    ("detect-unreadable-image", "detect.py", ["--weights", "{weights}", "--source", "{broken}"],
     "broken.jpg: not a readable image"),
    ("detect-flag", "detect.py", ["--weights", "{weights}", "--source", "{image}", "--conf-thres", "1.5"],
     "--conf-thres 1.5"),
    ("detect-threads", "detect.py", ["--weights", "{weights}", "--source", "{image}", "--threads", "0"],
     "--threads must be >= 1"),
    ("export-unsafe-weights", "export.py", ["--weights", "{evil}"], "evil.pt: not a valid"),
    ("export-weights-missing", "export.py", ["--weights", "{missing}"], "missing.pt: checkpoint file not found"),
    ("export-flag", "export.py", ["--weights", "{weights}", "--imgsz", "70"], "--imgsz 70 70"),
    ("yolo-model-yaml", "models/yolo.py", ["--cfg", "{unknown}"], "unknown module 'NoSuchBlock'"),
    ("convert-missing", "utils/data/convert.py", ["voc", "--xml", "{missing}.xml", "--out", "{runs}"],
     "missing.pt.xml: VOC annotation not found"),
]
OUTPUT_FLAGS = {"train.py": ["--project", "{runs}", "--epochs", "1", "--workers", "0", "--imgsz", "64",
                             "--batch-size", "2", "--noplots"],
                "val.py": ["--project", "{runs}", "--workers", "0", "--imgsz", "64"],
                "detect.py": ["--project", "{runs}", "--imgsz", "64"]}


def _argv(script: str, flags: list[str], files: dict[str, Path]) -> list[str]:
    full = OUTPUT_FLAGS.get(script, []) + flags  # later flags win: a case's --epochs/--imgsz overrides
    return [f.format(**files) for f in full]


def _check(script: str, rc: int, err: str, want: str, files: dict[str, Path]) -> None:
    prog = Path(script).name
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert "Traceback" not in err, err
    assert lines and lines[-1].startswith(f"{prog}: error: "), err
    assert want in lines[-1], lines[-1]
    assert sum(ln.startswith(f"{prog}: error:") for ln in lines) == 1, err  # printed exactly once
    assert not files["marker"].exists(), "the malicious pickle ran code"
    assert not files["runs"].exists(), "a failed start must not leave a run folder"


@pytest.fixture
def no_policy(monkeypatch):
    """In-process runs must not change this process's torch threads or allocator (apply_policy's off switch)."""
    monkeypatch.setenv("MOBILEYOLO_RUNTIME_POLICY", "0")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_user_error_in_process(case, files, capsys, no_policy):
    _, script, flags, want = case
    main = importlib.import_module(MODULES[script]).main
    rc = cli_main(Path(script).name, main, _argv(script, flags, files))
    _check(script, rc, capsys.readouterr().err, want, files)


@pytest.mark.parametrize("case", [pytest.param(c, marks=() if c[0] in CHEAP else pytest.mark.slow) for c in CASES],
                         ids=[c[0] for c in CASES])
def test_user_error_subprocess(case, files):
    _, script, flags, want = case
    cmd = [sys.executable, *COMMANDS.get(script, [script]), *_argv(script, flags, files)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    _check(script, proc.returncode, proc.stderr, want, files)


@pytest.mark.parametrize("script", list(MODULES))
def test_every_script_runs_main_under_cli_main(script):
    """The `__main__` block of each CLI is `sys.exit(cli_main("<name>", main))` (the subprocess cases
    above exercise it for real; this keeps the wiring checked in the default run)."""
    text = (ROOT / script).read_text()
    block = text[text.index('if __name__ == "__main__":\n    '):]
    assert f'sys.exit(cli_main("{Path(script).name}", main))' in block


def test_bad_flag_type_is_argparse_exit_2(capsys):
    """Values argparse itself rejects keep its own `prog: error:` line and exit code 2."""
    import detect

    with pytest.raises(SystemExit) as e:
        cli_main("detect.py", detect.main, ["--conf-thres", "high"])
    assert e.value.code == 2
    assert ": error: argument --conf-thres: invalid float value: 'high'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train.py", "val.py", "detect.py", "export.py"])
def test_bad_flag_type_subprocess(script):
    proc = subprocess.run([sys.executable, script, "--imgsz", "big"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert last.startswith(f"{script}: error: argument --imgsz") and "'big'" in last, proc.stderr


def test_cli_main_contract(capsys):
    def user(argv):
        raise FlagError("--x 3: must be\n  at most 2")

    assert cli_main("s.py", user) == 2
    cap = capsys.readouterr()
    assert cap.err == "s.py: error: --x 3: must be at most 2\n" and cap.out == ""
    assert isinstance(FlagError("x"), ValueError)  # callers that caught ValueError still do

    def empty(argv):
        raise UserError()

    assert cli_main("s.py", empty) == 2 and capsys.readouterr().err == "s.py: error: UserError\n"

    def ctrl_c(argv):
        raise KeyboardInterrupt

    assert cli_main("s.py", ctrl_c) == 130 and "interrupted" in capsys.readouterr().err
    assert cli_main("s.py", lambda argv: 3) == 3
    assert cli_main("s.py", lambda argv: {"metrics": 1}) == 0 and cli_main("s.py", lambda argv: True) == 0
    seen = []
    assert cli_main("s.py", seen.append, ["--a"]) == 0 and seen == [["--a"]]

    def bug(argv):
        raise ValueError("not a user error")

    with pytest.raises(ValueError, match="not a user error"):  # plain exceptions keep their traceback
        cli_main("s.py", bug)
    assert capsys.readouterr().err == ""


def test_unexpected_error_keeps_traceback(monkeypatch, files, capsys, no_policy):
    """An error that is not a UserError (a bug) propagates out of cli_main, so Python prints its traceback."""
    import detect

    def boom(**kwargs):
        raise RuntimeError("internal bug")

    monkeypatch.setattr(detect, "run", boom)
    with pytest.raises(RuntimeError, match="internal bug"):
        cli_main("detect.py", detect.main, ["--weights", str(files["weights"]), "--source", str(files["image"])])
    assert "error:" not in capsys.readouterr().err


@pytest.mark.slow
def test_unexpected_error_traceback_subprocess(files):
    code = ("import sys, detect\nfrom utils.core.errors import cli_main\n"
            "def boom(**kw):\n    raise RuntimeError('internal bug')\n"
            "detect.run = boom\n"
            f"sys.exit(cli_main('detect.py', detect.main, ['--weights', {str(files['weights'])!r}]))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and proc.stderr.strip().splitlines()[-1] == "RuntimeError: internal bug"
    assert "detect.py: error:" not in proc.stderr


class _Unreadable(torch.utils.data.Dataset):
    def __init__(self, path: Path) -> None:
        self.path = path

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int):
        return read_image(self.path)


def test_error_from_a_dataloader_worker_is_one_line(tmp_path, capsys):
    """A worker re-raises with its traceback inside the message; the line keeps only the worker's message
    (an image that changed on disk during training)."""
    bad = tmp_path / "gone.jpg"
    bad.write_bytes(b"not an image")

    def main(argv):
        loader = iter(torch.utils.data.DataLoader(_Unreadable(bad), num_workers=1))
        try:
            next(loader)
        finally:
            loader._shutdown_workers()  # now, not when the next test collects it (a 5 s join)

    assert cli_main("train.py", main) == 2
    err = capsys.readouterr().err
    assert err == f"train.py: error: {bad}: image could not be decoded\n"
