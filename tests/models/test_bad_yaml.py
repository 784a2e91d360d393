"""Bad model YAMLs of docs/RELIABILITY.md beyond tests/models/test_parse_errors.py: multiples, empty or
malformed sections, syntax errors. Each is one ModelConfigError naming the file (and the key or line)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from models import yolo
from models.registry import ModelConfigError
from models.yolo import Model
from tests.models.test_parse_errors import TINY
from utils.core.errors import cli_main

ROOT = Path(__file__).resolve().parents[2]

CASES = [  # id, text replaced in TINY, replacement, words the message must contain
    ("depth-zero", "depth_multiple: 1.0", "depth_multiple: 0", "'depth_multiple' must be a number > 0, got 0"),
    ("depth-negative", "depth_multiple: 1.0", "depth_multiple: -0.33", "'depth_multiple' must be a number > 0, got -0.33"),
    ("width-zero", "width_multiple: 1.0", "width_multiple: 0.0", "'width_multiple' must be a number > 0, got 0.0"),
    ("width-negative", "width_multiple: 1.0", "width_multiple: -1", "'width_multiple' must be a number > 0, got -1"),
    ("width-text", "width_multiple: 1.0", "width_multiple: wide", "'width_multiple' must be a number > 0, got 'wide'"),
    ("width-empty", "width_multiple: 1.0", "width_multiple:", "'width_multiple' must be a number > 0, got None"),
    ("head-empty-list", TINY[TINY.index("head:"):], "head: []\n", "'head' is empty; its last row must be Detect"),
    ("head-key-only", TINY[TINY.index("head:"):], "head:\n", "'head' is empty"),
    ("backbone-not-a-list", TINY[TINY.index("backbone:"):TINY.index("head:")], "backbone: MobileNetV3\n",
     "'backbone' must be a list of [from, number, module, args] rows, got str"),
]


@pytest.mark.parametrize("old, new, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_model_yaml(tmp_path: Path, old: str, new: str, words: str) -> None:
    assert old in TINY
    f = tmp_path / "bad.yaml"
    f.write_text(TINY.replace(old, new, 1))
    with pytest.raises(ModelConfigError) as e:
        Model(f)
    assert str(e.value).startswith(f"{f}: ") and words in str(e.value), str(e.value)


@pytest.mark.parametrize("text, line, column", [
    ("nc: 2\nbackbone: [[-1, 1, Conv, [8, 3, 2]]\nhead: []\n", 3, 1),  # unclosed flow sequence
    ("nc: 2\n  depth_multiple: 1.0\n", 2, 17),  # a key indented under a scalar
    ("nc: 2\nbackbone:\n\t- [-1, 1, Conv, [8, 3, 2]]\n", 3, 1),  # a tab
])
def test_yaml_syntax_error_names_line_and_column(tmp_path: Path, text: str, line: int, column: int, capsys) -> None:
    """The message carries PyYAML's marks: the 1-based line and column an editor shows."""
    f = tmp_path / "syntax.yaml"
    f.write_text(text)
    with pytest.raises(ModelConfigError) as e:
        Model(f)
    msg = str(e.value)
    assert msg.startswith(f"{f}:{line}:{column}: not valid YAML ("), msg
    # at the command line: one line, no traceback
    assert cli_main("yolo.py", yolo.main, ["--cfg", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"yolo.py: error: {f}:{line}:{column}: not valid YAML"), err


@pytest.mark.slow
def test_bad_multiple_subprocess_is_one_line(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(TINY.replace("width_multiple: 1.0", "width_multiple: 0", 1))
    proc = subprocess.run([sys.executable, "models/yolo.py", "--cfg", str(f)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"yolo.py: error: {f}: 'width_multiple' must be a number > 0, got 0"
