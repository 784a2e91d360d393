"""Convert a YOLOv5 v6/v7 `.pt` file into a MobileYOLO checkpoint (plain data, `weights_only` loadable).

    python models/yolov5_convert.py yolov5s.pt --out yolov5s-mobileyolo.pt

The YOLOv5 file is read by `models.yolov5_compat` (a restricted unpickler: nothing in it runs); the
model is built from its own YAML rows and the weights are checked to fit before anything is written.
The output is written atomically by `save_checkpoint`. train.py, val.py, detect.py and export.py also
take the YOLOv5 file directly; converting once just makes later loads plain `weights_only` reads.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as `python models/yolov5_convert.py`: import from the repo root, not from models/ (script only).
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse

from models.checkpoint import (
    CheckpointError,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from utils.core.errors import FlagError, cli_main


def convert(weights: str | Path, out: str | Path | None = None) -> Path:
    """Read YOLOv5 `weights`, verify the model builds and its weights fit, write our checkpoint to `out`
    (default `<stem>-mobileyolo.pt` beside it); returns the written path.

    Raises CheckpointError for an unreadable, unsafe or unsupported file (naming it, and the refused global
    for pickled code), and for a file that already is a MobileYOLO checkpoint; FlagError when `out` is
    the input itself.
    """
    weights = Path(weights)
    out = Path(out) if out else weights.with_name(f"{weights.stem}-mobileyolo.pt")
    if out.resolve() == weights.resolve():
        raise FlagError(f"--out {out}: is the input file; choose another path")
    ckpt = load_checkpoint(weights)
    if not ckpt.get("converted_from"):
        raise CheckpointError(f"{weights}: already a MobileYOLO checkpoint; nothing to convert")
    model = model_from_checkpoint(ckpt)  # raises CheckpointError when the weights do not fit the rows
    save_checkpoint(ckpt, out)
    n = sum(p.numel() for p in model.parameters())
    weights_used = "EMA weights" if ckpt.get("ema") is not None else "model weights"
    print(f"{weights} ({ckpt['converted_from']}, {len(ckpt['names'])} classes, {n:,} parameters, "
          f"{weights_used}) -> {out}")
    return out


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description="Convert a YOLOv5 v6/v7 .pt file into a MobileYOLO checkpoint.")
    p.add_argument("weights", help="YOLOv5 .pt file (ultralytics/yolov5 v6/v7 or the yolov5 pip package)")
    p.add_argument("--out", default=None, help="output checkpoint (default: <stem>-mobileyolo.pt beside the input)")
    args = p.parse_args(argv)
    return convert(args.weights, args.out)


if __name__ == "__main__":
    sys.exit(cli_main("yolov5_convert.py", main))
