"""The project's error base class and the command-line rule for it.

Every error a user can cause and fix (a bad data YAML, an unusable dataset, a bad model YAML, bad or
unsafe weights, a bad source, bad flags) is a `UserError`; its message names the file, line or row.
Scripts run their `main()` under `cli_main`, which prints such an error as one line
`<script>: error: <message>` and exits 2, and leaves every other exception its traceback.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


class UserError(Exception):
    """Base of the errors whose message is the whole story (no traceback needed at the command line).

    Subclasses keep the built-in base callers already catch: `class DataConfigError(UserError, ValueError)`.
    """


class FlagError(UserError, ValueError):
    """A command-line value that parses but cannot be used (`--epochs 0`, `--conf-thres 1.5`); names the flag."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist; the message names it."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of `str(e)` (at most `limit` characters), or the exception's type name when empty."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__


def user_message(e: BaseException) -> str:
    """`str(e)` on one line; for an error re-raised from a DataLoader worker (its message carries the
    worker's traceback), only the worker's own message."""
    text = str(e)
    if "\nOriginal Traceback" in text:
        last = [ln for ln in text.splitlines() if ln.strip()][-1]
        name = f"{type(e).__module__}.{type(e).__qualname__}: "
        text = last.split(name, 1)[1] if name in last else last
    return " ".join(text.split()) or type(e).__name__


def cli_main(prog: str, main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> int:
    """Run `main(argv)` as a command: `UserError` -> one line on stderr and 2; Ctrl-C -> 130; else 0.

    `prog` is the script's name as the user typed it (`train.py`). An integer that `main` returns is
    passed through as the exit code; anything else means success.
    """
    try:
        out = main(argv)
    except UserError as e:
        msg = user_message(e)  # one line, whatever the message held
        sys.stdout.flush()  # what main() printed comes before the error line
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        sys.stdout.flush()
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return out if isinstance(out, int) and not isinstance(out, bool) else 0


def yaml_error(yaml_file: object, e: BaseException) -> str:
    """`file:line:column: not valid YAML (problem)` for a YAML parse error (1-based line and column)."""
    mark = getattr(e, "problem_mark", None)
    where = f"{yaml_file}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(yaml_file)
    problem = getattr(e, "problem", None) or " ".join(str(e).split())
    return f"{where}: not valid YAML ({problem})"
