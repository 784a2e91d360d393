"""Export a trained checkpoint to ONNX and/or TorchScript, with decoding inside the graph.

    python export.py --weights runs/train/exp/weights/best.pt --include onnx torchscript --imgsz 320

Each file has one input `images [b, 3, h, w]` (float RGB 0..1, letterboxed) and one output
`output0 [b, N, 5 + nc]` (cx, cy, w, h in input pixels, obj, class probabilities), and carries the class
names, strides and export size as metadata (read back by `utils.infer.backend.DetectBackend`, so
`detect.py`/`val.py --weights best.onnx` just work). After writing, each file is run once on a real
image and compared with PyTorch; a mismatch beyond the tolerance below raises `ExportError`.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from utils.core.errors import UserError, cli_main
from utils.core.paths import ROOT
from utils.data.images import read_image
from utils.data.letterbox import letterbox
from utils.export.exporters import export_onnx, export_torchscript
from utils.export.metadata import export_metadata
from utils.infer.backend import BackendError, DetectBackend
from utils.infer.runtime import apply_policy
from utils.ops.decode import Decoder

LOGGER = logging.getLogger("mobileyolo.export")
FORMATS = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript"}
# Parity tolerance. Scores (obj, class probabilities, 0..1) must agree within ABS_TOL. Box columns are
# pixels up to a few hundred, where one float32 ulp is ~3e-5 and a reordered sum (fused conv, ORT's
# kernels) moves the result a few ulps, so boxes are held to ABS_TOL relative to their magnitude:
# |a - b| <= ABS_TOL * max(1, |ref|). For values below 1 px both rules are the same plain 1e-4.
ABS_TOL = 1e-4
REFERENCE_DIR = ROOT / "data" / "bccd" / "images" / "val"


class ExportError(UserError, RuntimeError):
    """An export that failed its parity check against PyTorch, or bad export arguments."""


@dataclass
class Parity:
    """PyTorch vs exported file on the same input: max abs diffs and the relative box error."""

    fmt: str
    max_abs: float  # all columns
    max_abs_scores: float  # obj + class probabilities
    max_abs_boxes: float  # cx, cy, w, h pixels
    max_rel_boxes: float  # |diff| / max(1, |ref|) on the box columns

    @property
    def ok(self) -> bool:
        return self.max_abs_scores <= ABS_TOL and self.max_rel_boxes <= ABS_TOL

    def __str__(self) -> str:
        return (f"{self.fmt} vs PyTorch: max abs diff {self.max_abs:.3g} (scores {self.max_abs_scores:.3g}, "
                f"boxes {self.max_abs_boxes:.3g} px, box relative {self.max_rel_boxes:.3g}; tolerance {ABS_TOL:g})")


def reference_batch(imgsz: tuple[int, int], batch: int = 1, image: str | Path | None = None) -> torch.Tensor:
    """A real image (first bundled BCCD val image unless `image` is given) letterboxed to `imgsz` (h, w),
    as float RGB 0..1 `[batch, 3, h, w]` (the same image repeated)."""

    if image is None:
        files = sorted(REFERENCE_DIR.glob("*.jpg"))
        if not files:
            raise ExportError(f"{REFERENCE_DIR}: no .jpg to check the export on; pass check_image=")
        image = files[0]
    img = letterbox(read_image(image), tuple(imgsz), auto=False)[0]
    x = torch.from_numpy(np.ascontiguousarray(img[..., ::-1].transpose(2, 0, 1))).float() / 255
    return x[None].repeat(batch, 1, 1, 1)


def compare(fmt: str, ref: torch.Tensor, out: torch.Tensor) -> Parity:
    """Parity figures of `out` against `ref`, both `[B, N, 5 + nc]`."""
    if out.shape != ref.shape:
        raise ExportError(f"{fmt}: output shape {tuple(out.shape)} differs from PyTorch {tuple(ref.shape)}")
    d = (out.double() - ref.double()).abs()
    rel = d[..., :4] / ref[..., :4].double().abs().clamp(min=1.0)
    return Parity(fmt, float(d.max()), float(d[..., 4:].max()), float(d[..., :4].max()), float(rel.max()))


def _load_model(weights: str | Path) -> tuple[torch.nn.Module, dict]:

    try:
        ckpt = load_checkpoint(weights)
        model = model_from_checkpoint(ckpt)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    if model.detect is None:
        raise ExportError(f"{weights}: a classification checkpoint; export handles detection models")
    model.fuse().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Decoder(model).eval(), ckpt


def run(weights: str | Path, include: tuple[str, ...] | list[str] = ("onnx", "torchscript"),
        imgsz: int | tuple[int, int] | list[int] = 320, batch_size: int = 1, dynamic: bool = False,
        simplify: bool = False, opset: int = 17, check_image: str | Path | None = None,
        outdir: str | Path | None = None, threads: int | None = None, spin: bool = True) -> dict[str, Path]:
    """Export `weights` (.pt checkpoint) to each format in `include`; returns {format: file}.

    Files go next to the weights (or into `outdir`) as `<stem>.onnx` / `<stem>.torchscript`. `imgsz` is
    the input size (int or [h, w], multiples of the model stride). Raises `ExportError` for bad
    arguments, an unreadable checkpoint or a failed parity check (the file is kept for inspection).
    `threads` and `spin` are passed to the `DetectBackend` that runs the check (default: physical cores).
    """
    include = [f.lower() for f in include]
    bad = [f for f in include if f not in FORMATS]
    if bad or not include:
        raise ExportError(f"--include {' '.join(bad) or '(nothing)'}: choose from {', '.join(FORMATS)}")
    if batch_size < 1:
        raise ExportError(f"--batch-size must be >= 1, got {batch_size}")
    if opset < 14:
        LOGGER.warning(f"--opset {opset}: HardSwish needs opset >= 14; h-swish will be decomposed into "
                       f"HardSigmoid + Mul")
    wrapper, ckpt = _load_model(weights)
    strides = [float(s) for s in wrapper.model.detect.stride.tolist()]
    hw = (int(imgsz[0]), int(imgsz[-1])) if isinstance(imgsz, (list, tuple)) else (int(imgsz), int(imgsz))
    if hw[0] % max(strides) or hw[1] % max(strides):
        raise ExportError(f"--imgsz {hw[0]} {hw[1]}: must be multiples of the model stride {int(max(strides))}")
    names = [str(n) for n in ckpt["names"]]
    x = reference_batch(hw, batch_size, check_image)
    with torch.inference_mode():
        ref = wrapper(x)
    outdir = Path(outdir) if outdir else Path(weights).parent
    files = {}
    for fmt in include:
        t0 = time.perf_counter()
        file = outdir / (Path(weights).stem + SUFFIX[fmt])
        # a traced TorchScript module keeps sizes symbolic, so it is always shape-generic
        meta = export_metadata(names, strides, hw, batch_size, dynamic or fmt == "torchscript")
        if fmt == "onnx":
            export_onnx(wrapper, torch.zeros_like(x), file, meta, opset=opset, dynamic=dynamic, simplify=simplify)
        else:
            export_torchscript(wrapper, torch.zeros_like(x), file, meta)
        try:
            parity = compare(fmt, ref, DetectBackend(file, threads=threads, spin=spin)(x))
        except BackendError as e:
            raise ExportError(f"{file}: written but cannot be loaded back: {e}") from None
        size_mb = file.stat().st_size / 1e6
        print(f"{fmt}: {file} ({size_mb:.1f} MB, {time.perf_counter() - t0:.1f}s); {parity}")
        if not parity.ok:
            raise ExportError(f"{file}: export does not match PyTorch: {parity}")
        files[fmt] = file
    return files


def main(argv: list[str] | None = None) -> int:
    """CLI entry: parse, apply the runtime policy once, export. Errors propagate (`cli_main` prints them)."""
    parser = argparse.ArgumentParser(description="Export a MobileYOLO checkpoint to ONNX / TorchScript.")
    parser.add_argument("--weights", required=True, help="checkpoint (.pt) to export")
    parser.add_argument("--include", nargs="+", default=["onnx", "torchscript"], choices=FORMATS,
                        help="formats to write")
    parser.add_argument("--imgsz", "--img", "--img-size", nargs="+", type=int, default=[320],
                        help="input size: one value (square) or h w")
    parser.add_argument("--batch-size", type=int, default=1, help="batch size of the exported input")
    parser.add_argument("--dynamic", action="store_true",
                        help="ONNX: symbolic batch/height/width axes (TorchScript exports are always shape-generic)")
    parser.add_argument("--simplify", action="store_true", help="run onnxsim on the ONNX graph if installed")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset version")
    parser.add_argument("--check-image", default=None, help="image for the PyTorch parity check")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    policy = apply_policy(threads=None)
    files = run(args.weights, args.include, args.imgsz, args.batch_size, args.dynamic, args.simplify,
                args.opset, args.check_image, spin=policy.spin)
    print("Export done: " + ", ".join(str(f) for f in files.values()))
    print(f"Use: python detect.py --weights {next(iter(files.values()))}")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main("export.py", main))
