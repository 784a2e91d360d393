"""One table per deployment format: size, mAP and batch-1 latency of every export of one checkpoint.

    python benchmarks/formats.py --weights runs/train/exp/weights/best.pt --data data/bccd.yaml

Exports `weights` with export.py to each format (float32 and, with `--int8`, INT8 where the format has
it), validates every file on the data's val split through `DetectBackend` exactly as val.py does
(square letterbox at the export size), and times batch-1 calls at the export size, all formats in
interleaved rounds (benchmarks/latency.py), `--threads` threads each. Prints one row per file: format,
precision, size, mAP50, mAP50-95, median ms and the ratio to the .pt's time. Numbers are from the
machine it runs on; a busy machine shifts the ms, not the ratios of one run much (rounds are paired).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # script run: import from the repo root

import export
from benchmarks.latency import interleaved_medians
from utils.infer.backend import DetectBackend

FORMATS = ("onnx", "torchscript", "openvino", "ncnn", "tflite", "executorch")


@dataclass
class Row:
    """One export in the table."""

    fmt: str
    precision: str
    file: Path
    size_mb: float
    map50: float
    map: float
    ms: float = 0.0
    ratio: float = 0.0


def export_all(weights: Path, data: str | Path, imgsz: int, formats: tuple[str, ...], int8: bool, outdir: Path,
               threads: int, calib_images: int) -> dict[str, Path]:
    """{'pt': weights, fmt: file, fmt-int8: file} written by export.run into `outdir` (its output hidden)."""
    with contextlib.redirect_stdout(io.StringIO()):
        files = export.run(weights, formats, imgsz=imgsz, outdir=outdir, threads=threads, int8=int8,
                           data=data if int8 else None, calib_images=calib_images, gate=False)
    return {"pt": Path(weights), **files}


def run(weights: str | Path, data: str | Path, imgsz: int = 320, formats: tuple[str, ...] = FORMATS,
        int8: bool = True, runs: int = 30, threads: int = 2, calib_images: int = 100,
        outdir: str | Path | None = None) -> list[Row]:
    """Export, validate and time every format; print the table and return its rows (.pt first)."""
    logging.getLogger("mobileyolo.export").setLevel(logging.WARNING)
    outdir = Path(outdir) if outdir else Path(tempfile.mkdtemp(prefix="mobileyolo-formats-"))
    outdir.mkdir(parents=True, exist_ok=True)
    files = export_all(Path(weights), data, imgsz, tuple(formats), int8, outdir, threads, calib_images)
    torch.set_num_threads(threads)  # the .pt and TorchScript rows run on torch's own pool
    rows, fns = [], {}
    x = export.reference_batch((imgsz, imgsz))
    for key, file in files.items():
        with contextlib.redirect_stdout(io.StringIO()):  # the evaluator prints its table per file
            m = export.export_map(file, data, imgsz, threads=threads)
        backend = DetectBackend(file, threads=threads)
        fmt, _, prec = key.partition("-")
        rows.append(Row(fmt, prec or "fp32", file,
                        export.export_size(file) / 1e6, float(m.map50), float(m.map)))
        fns[key] = lambda b=backend: b(x)
    medians = interleaved_medians(fns, runs, warmup=3, desc="timing")
    for row, key in zip(rows, files):
        row.ms = medians[key]
        row.ratio = row.ms / medians["pt"]
    print_table(rows, imgsz, threads)
    return rows


def print_table(rows: list[Row], imgsz: int, threads: int) -> None:
    """The Markdown table README.md shows."""
    print(f"| format | precision | file | size (MB) | mAP50 | mAP50-95 | ms ({imgsz}, {threads} threads) | x .pt |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        name = r.file.name + ("/" if r.file.is_dir() else "")
        print(f"| {r.fmt} | {r.precision} | {name} | {r.size_mb:.2f} | {r.map50:.3f} | {r.map:.3f} | "
              f"{r.ms:.1f} | {r.ratio:.2f} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", required=True, help="checkpoint (.pt)")
    p.add_argument("--data", required=True, help="data YAML: val split for mAP, train split for INT8 calibration")
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--include", nargs="+", default=list(FORMATS), choices=export.FORMATS)
    p.add_argument("--no-int8", dest="int8", action="store_false", help="float exports only")
    p.add_argument("--runs", type=int, default=30, help="timed calls per format")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calib-images", type=int, default=100)
    p.add_argument("--outdir", default=None, help="where the exports go (default: a temporary folder)")
    a = p.parse_args(argv)
    run(a.weights, a.data, a.imgsz, tuple(a.include), a.int8, a.runs, a.threads, a.calib_images, a.outdir)


if __name__ == "__main__":
    main()
