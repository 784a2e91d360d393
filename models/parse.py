"""YAML model dict -> layers. One generic loop: every block says how its channels follow (registry).

A row is `[from, number, module, args]`:
- `from`: int or list of ints; -1 is the previous row (the image for row 0), other negatives count
  back from the row, non-negatives are absolute row indices (earlier rows only).
- `number`: repeats, scaled by `depth_multiple` as `max(round(n * gd), 1)` when n > 1, then applied
  according to the block's `depth_rule`.
- `module`: a registered name (see `models.registry.REGISTRY`).
- `args`: list; strings naming a top-level key (`nc`, `anchors`, ...) or `None`/`True`/`False` are
  replaced by their value (a lookup, never `eval`).
"""
from __future__ import annotations

import math
from typing import Any

from torch import nn

# Importing the block modules fills the registry (they register on import).
import models.common  # noqa: F401
import models.head  # noqa: F401
import models.mobilenetv3  # noqa: F401
import models.shufflenetv2  # noqa: F401
from models.registry import ModelConfigError, lookup

LITERALS: dict[str, Any] = {"None": None, "True": True, "False": False}
SECTIONS = ("backbone", "head")


def resolve_arg(a: Any, cfg: dict[str, Any]) -> Any:
    """A YAML arg with names resolved: top-level cfg keys, then None/True/False, else unchanged."""
    if isinstance(a, str):
        if a in cfg and a not in SECTIONS:
            return cfg[a]
        return LITERALS.get(a, a)
    return a


def _from_indices(f: Any, i: int) -> tuple[int | list[int], list[int]]:
    """Normalised `from` (-1 kept, other negatives made absolute) and the absolute source rows.

    Source -1 for row 0 means the input image. Raises ValueError when out of range or forward.
    """
    items = f if isinstance(f, list) else [f]
    if not items or not all(isinstance(j, int) and not isinstance(j, bool) for j in items):
        raise ValueError(f"`from` must be an int or a non-empty list of ints, got {f!r}")
    norm: list[int] = []
    for j in items:
        a = i + j if j < 0 else j
        if j == -1:
            a = i - 1
        if a >= i:
            raise ValueError(f"`from` {j} points forward (row {a} >= this row {i})")
        if a < 0 and not (i == 0 and j == -1):
            raise ValueError(f"`from` {j} is out of range (resolves to row {a})")
        norm.append(-1 if a == i - 1 and j == -1 else a)
    sources = [i - 1 if j == -1 else j for j in norm]
    return (norm if isinstance(f, list) else norm[0]), sources


def _scaled_depth(cls: type, n: Any, gd: float) -> tuple[int, int]:
    """(n passed to the constructor or 0, number of stacked copies) for the block's depth rule."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"`number` must be a positive int, got {n!r}")
    rule = getattr(cls, "depth_rule", "repeat")
    if rule == "none":
        if n != 1:
            raise ValueError(f"{cls.__name__} cannot be repeated (number must be 1, got {n})")
        return 0, 1
    n = max(round(n * gd), 1) if n > 1 else n
    return (n, 1) if rule == "arg" else (0, n)


def _build_row(cls: type, c_in: list[int], args: list[Any], gw: float, n_arg: int,
               copies: int) -> tuple[nn.Module, int]:
    """Instantiate one row (a Sequential when stacked); returns (module, output channels)."""
    lo, hi = getattr(cls, "yaml_args", (0, 99))
    if not lo <= len(args) <= hi:
        want = f"{lo}" if lo == hi else f"{lo}..{hi}"
        raise ValueError(f"{cls.__name__} takes {want} args, got {len(args)}: {args!r}")
    mods, c = [], c_in
    for k in range(copies):
        ctor, c_out = cls.channels(c, list(args), gw)
        if n_arg:
            ctor.insert(2, n_arg)
        mods.append(cls(*ctor))
        c = [c_out]
    return (mods[0] if copies == 1 else nn.Sequential(*mods)), c_out


def _multiple(cfg: dict[str, Any], key: str, source: str) -> float:
    """`depth_multiple` / `width_multiple` (default 1.0): a finite number > 0, else ModelConfigError."""
    v = cfg.get(key, 1.0)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ModelConfigError(f"{source}: '{key}' must be a number > 0, got {v!r}")
    return float(v)


def parse_model(cfg: dict[str, Any], ch: int = 3, source: str = "<dict>"
                ) -> tuple[nn.ModuleList, set[int], list[int]]:
    """Build the layers of a model dict. Returns (layers, save, out_channels per row).

    Each layer gets `.i` (row index), `.f` (normalised from), `.type` (YAML module name),
    `.np` (parameter count), `.n` (copies or inner repeats), `.args` (resolved YAML args).
    `save` holds the rows whose outputs later rows read (besides the previous row).
    Errors: `ModelConfigError` naming `source`, the row index and the row.
    """
    gd, gw = _multiple(cfg, "depth_multiple", source), _multiple(cfg, "width_multiple", source)
    for s in SECTIONS:
        if cfg.get(s) is not None and not isinstance(cfg[s], list):
            raise ModelConfigError(f"{source}: '{s}' must be a list of [from, number, module, args] rows, "
                                   f"got {type(cfg[s]).__name__} {cfg[s]!r:.60}")
    if "head" in cfg and not cfg["head"]:  # absent: a backbone-only model (block tests); empty: a mistake
        raise ModelConfigError(f"{source}: 'head' is empty; its last row must be Detect (or Classify)")
    rows = [(s, r) for s in SECTIONS for r in (cfg.get(s) or [])]
    if not rows:
        raise ModelConfigError(f"{source}: no rows in 'backbone'/'head'")
    layers, save, chs = nn.ModuleList(), set(), []
    for i, (section, row) in enumerate(rows):
        try:
            if not isinstance(row, (list, tuple)) or len(row) != 4:
                raise ValueError("a row must be [from, number, module, args]")
            f, n, name, args = row
            if not isinstance(name, str):
                raise ValueError(f"module must be a name, got {name!r}")
            args = [resolve_arg(a, cfg) for a in (args if isinstance(args, list) else [args])]
            cls = lookup(name)
            f_norm, sources = _from_indices(f, i)
            if getattr(cls, "takes_list", False):  # Concat, Detect: always called with a list
                f_norm = f_norm if isinstance(f_norm, list) else [f_norm]
            elif isinstance(f_norm, list) and len(f_norm) == 1:  # `[-1]` means the same as `-1`
                f_norm = f_norm[0]
            c_in = [ch if j < 0 else chs[j] for j in sources]
            n_arg, copies = _scaled_depth(cls, n, gd)
            m, c_out = _build_row(cls, c_in, args, gw, n_arg, copies)
        except ModelConfigError:
            raise
        except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            raise ModelConfigError(f"{source}: row {i} ({section}) {row!r}: {msg}") from e
        m.i, m.f, m.type, m.n, m.args = i, f_norm, name, n_arg or copies, args
        m.np = sum(p.numel() for p in m.parameters())
        save.update(j for j in (f_norm if isinstance(f_norm, list) else [f_norm]) if j >= 0)
        layers.append(m)
        chs.append(c_out)
    return layers, save, chs

