"""Label rows: every bad-row case of the issue is one parametrised row here."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from utils.data.labels import parse_label_file, parse_row

OK = [  # line, nc, expected (cls, cx, cy, w, h)
    ("0 0.5 0.5 0.2 0.2", 3, [0, 0.5, 0.5, 0.2, 0.2]),
    ("2 0.5 0.5 0.2 0.2   ", 3, [2, 0.5, 0.5, 0.2, 0.2]),  # trailing spaces
    ("1.0 0.25 0.75 0.5 0.5", 3, [1, 0.25, 0.75, 0.5, 0.5]),  # integral float class
    ("0 0.5 0.5 1.008 0.2", 3, [0, 0.5, 0.5, 1.0, 0.2]),  # inside tolerance: clipped
    ("0 0.004 0.5 0.02 0.2", 3, [0, 0.007, 0.5, 0.014, 0.2]),  # left edge -0.006: clipped
    ("0 0.1 0.1 0.5 0.1 0.3 0.6", 3, [0, 0.3, 0.35, 0.4, 0.5]),  # polygon -> its box
    ("7 0.5 0.5 0.2 0.2", None, [7, 0.5, 0.5, 0.2, 0.2]),  # nc unknown: any class id
]

BAD = [  # line, nc, words the reason must contain
    ("0 0.5 0.5 0.2", 3, "got 4"),
    ("0 0.5 0.5 0.2 0.2 0.1", 3, "got 6"),  # 6 columns: neither a box nor a polygon
    ("0 0.1 0.1 0.5 0.1 0.3 0.6 0.2", 3, "got 8"),  # odd number of polygon coordinates
    ("0 0.5 abc 0.2 0.2", 3, "non-numeric token 'abc'"),
    ("car 0.5 0.5 0.2 0.2", 3, "non-numeric token 'car'"),
    ("0 nan 0.5 0.2 0.2", 3, "non-finite"),
    ("-1 0.5 0.5 0.2 0.2", 3, "non-negative integer"),
    ("1.5 0.5 0.5 0.2 0.2", 3, "non-negative integer"),
    ("3 0.5 0.5 0.2 0.2", 3, "class 3 >= nc=3"),
    ("0 0.5 0.5 0 0.2", 3, "> 0"),
    ("0 0.5 0.5 0.2 -0.1", 3, "> 0"),
    ("0 1.2 0.5 0.2 0.2", 3, "outside 0..1"),
    ("0 0.5 0.5 1.1 0.2", 3, "outside 0..1"),
    ("0 0.5 -0.05 0.2 0.02", 3, "outside 0..1"),
    ("0 0.1 0.1 0.1 0.5 0.1 0.9", 3, "zero width"),  # degenerate polygon
]


@pytest.mark.parametrize("line, nc, want", OK)
def test_good_rows(line: str, nc: int | None, want: list[float]) -> None:
    row, why = parse_row(line, nc)
    assert why == "" and row is not None
    np.testing.assert_allclose(row, want, atol=1e-6)


@pytest.mark.parametrize("line, nc, reason", BAD)
def test_bad_rows_dropped_with_reason(line: str, nc: int, reason: str) -> None:
    row, why = parse_row(line, nc)
    assert row is None and reason in why


def test_blank_line_is_silent() -> None:
    assert parse_row("   \t", 3) == (None, "")


def test_file_crlf_blank_duplicates_and_named_warnings(tmp_path: Path) -> None:
    f = tmp_path / "lab é s.txt"
    f.write_bytes(b"\xef\xbb\xbf0 0.5 0.5 0.2 0.2\r\n\r\n1 0.3 0.3 0.1 0.1  \r\n0 0.5 0.5 0.2 0.2\r\n"
                  b"5 0.5 0.5 0.2 0.2\r\n0 0.50 0.5 0.2 0.200\r\n")
    labels, msgs = parse_label_file(f, nc=3)
    assert labels.dtype == np.float32 and labels.shape == (2, 5)
    np.testing.assert_allclose(labels[:, 0], [0, 1])
    assert len(msgs) == 2
    assert f"{f}:5: class 5 >= nc=3; row dropped" == msgs[0]
    assert "2 duplicate row(s) removed (line 4, 6)" in msgs[1] and str(f) in msgs[1]


def test_missing_and_empty_files_are_background(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    for p in (tmp_path / "empty.txt", tmp_path / "absent.txt"):
        labels, msgs = parse_label_file(p, nc=3)
        assert labels.shape == (0, 5) and msgs == []
