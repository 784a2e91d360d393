"""Export a trained checkpoint to ONNX, TorchScript, OpenVINO, NCNN, TFLite (and ExecuTorch), float or INT8.

    python export.py --weights runs/train/exp/weights/best.pt --include onnx torchscript openvino --imgsz 320
    python export.py --weights best.pt --include onnx openvino tflite --int8 --data data/bccd.yaml

ONNX and TorchScript files have one input `images [b, 3, h, w]` (float RGB 0..1, letterboxed) and one
output `output0 [b, N, 5 + nc]` (cx, cy, w, h in input pixels, obj, class probabilities); OpenVINO, NCNN
and TFLite graphs end at the head's raw maps and their runners decode with our decoder. Every export
carries the class names, strides, anchors and export size as metadata (read back by
`utils.infer.backend.DetectBackend`, so `detect.py`/`val.py --weights <export>` just work). After
writing, each float file is run once on a real image and compared with PyTorch; a mismatch beyond the
tolerance below raises `ExportError`. INT8 files (`--int8 --data D`: `best-int8.onnx`,
`best_int8_openvino_model/`, `best_int8.tflite`) are gated on accuracy instead: fp32 and INT8 mAP50 and
mAP50-95 on D's val split are printed side by side, with a loud warning beyond a 0.02 mAP50-95 drop.
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
from utils.data.data_yaml import check_dataset
from utils.data.images import read_image
from utils.data.letterbox import letterbox
from utils.data.loader import create_dataloader
from utils.eval.evaluator import evaluate
from utils.eval.metrics import Metrics
from utils.export.calibrate import DEFAULT_IMAGES, calibration_batches
from utils.export.executorch import export_executorch, pte_file, pte_int8_file
from utils.export.exporters import export_onnx, export_torchscript
from utils.export.metadata import export_metadata
from utils.export.ncnn import export_ncnn, ncnn_dir
from utils.export.onnx_int8 import int8_onnx_path, quantize_onnx
from utils.export.openvino import export_openvino, openvino_dir
from utils.export.tflite import export_tflite, tflite_file
from utils.infer.backend import BackendError, DetectBackend
from utils.infer.runtime import apply_policy
from utils.ops.decode import Decoder

LOGGER = logging.getLogger("mobileyolo.export")
FORMATS = ("onnx", "torchscript", "openvino", "ncnn", "tflite", "executorch")  # YOLOv5's names
INT8_FORMATS = ("onnx", "openvino", "tflite", "executorch")
MAX_INT8_SIZE = 0.35  # an INT8 export should be at most this fraction of its float32 size
MAX_INT8_DROP = 0.02  # mAP50-95 an INT8 export may lose before export.py warns loudly
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


def _check_args(include: list[str], batch_size: int, opset: int, int8: bool, data: str | Path | None,
                half: bool) -> None:
    bad = [f for f in include if f not in FORMATS]
    if bad or not include:
        raise ExportError(f"--include {' '.join(bad) or '(nothing)'}: choose from {', '.join(FORMATS)}")
    if batch_size < 1:
        raise ExportError(f"--batch-size must be >= 1, got {batch_size}")
    if int8 and not data:
        raise ExportError("--int8 needs --data D (a data YAML: calibration images from its train split, "
                          "the accuracy check on its val split)")
    if int8 and not set(include) & set(INT8_FORMATS):
        raise ExportError(f"--int8: none of {' '.join(include)} has an INT8 export; use {', '.join(INT8_FORMATS)}")
    if half and "openvino" not in include:
        LOGGER.warning("--half: only OpenVINO exports use it (reduced precision at run time); ignored")
    if opset < 14:
        LOGGER.warning(f"--opset {opset}: HardSwish needs opset >= 14; h-swish will be decomposed into "
                       f"HardSigmoid + Mul")


def _write(fmt: str, wrapper: Decoder, x: torch.Tensor, weights: Path, outdir: Path, meta: dict[str, str],
           opts: dict, calib: list[np.ndarray] | None = None) -> Path:
    """Write one export (float, or INT8 when `calib` is given) and return the path DetectBackend takes."""
    im = torch.zeros_like(x)
    if fmt == "onnx" and calib is not None:
        return quantize_onnx(outdir / (weights.stem + ".onnx"), int8_onnx_path(weights, outdir), calib,
                             keep_head_float=opts["keep_head_float"])
    if fmt == "onnx":
        return export_onnx(wrapper, im, outdir / (weights.stem + ".onnx"), meta, opset=opts["opset"],
                           dynamic=opts["dynamic"], simplify=opts["simplify"])
    if fmt == "torchscript":
        return export_torchscript(wrapper, im, outdir / (weights.stem + ".torchscript"), meta)
    if fmt == "openvino":
        return export_openvino(wrapper, im, openvino_dir(weights, outdir, int8=calib is not None), meta,
                               dynamic=opts["dynamic"], half=opts["half"], calib=calib,
                               keep_head_float=opts["keep_head_float"])
    if fmt == "ncnn":
        return export_ncnn(wrapper, im, ncnn_dir(weights, outdir), meta)
    if fmt == "tflite":
        return export_tflite(wrapper, im, tflite_file(weights, calib is not None, outdir), meta, calibration=calib)
    pte = pte_file(weights, outdir) if calib is None else pte_int8_file(weights, outdir)
    return export_executorch(wrapper, im, pte, meta, calibration=calib)


def export_size(path: Path) -> int:
    """Bytes of an export: the file, or every file of an export folder."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def _load_back(file: Path, threads: int | None, spin: bool) -> DetectBackend:
    try:
        return DetectBackend(file, threads=threads, spin=spin)
    except BackendError as e:
        raise ExportError(f"{file}: written but cannot be loaded back: {e}") from None


def run(weights: str | Path, include: tuple[str, ...] | list[str] = ("onnx", "torchscript"),
        imgsz: int | tuple[int, int] | list[int] = 320, batch_size: int = 1, dynamic: bool = False,
        simplify: bool = False, opset: int = 17, check_image: str | Path | None = None,
        outdir: str | Path | None = None, threads: int | None = None, spin: bool = True, half: bool = False,
        int8: bool = False, data: str | Path | None = None, calib_images: int = DEFAULT_IMAGES,
        keep_head_float: bool = True, gate: bool = True) -> dict[str, Path]:
    """Export `weights` (.pt checkpoint) to each format in `include`; returns {format: path}, INT8 ones
    under `<format>-int8`.

    Paths follow YOLOv5 beside the weights (or in `outdir`): `<stem>.onnx`, `<stem>.torchscript`,
    `<stem>_openvino_model/`, `<stem>_ncnn_model/`, `<stem>_float32.tflite`, `<stem>.pte`; with `int8`
    also `<stem>-int8.onnx`, `<stem>_int8_openvino_model/`, `<stem>_int8.tflite`, `<stem>_int8.pte` (calibrated on
    `calib_images` train images of the data YAML `data`, then gated on its val split: `int8_gate`).
    `imgsz` is the input size (int or [h, w], multiples of the model stride). `half`: OpenVINO at reduced
    precision (parity printed, not enforced). Raises `ExportError` for bad arguments, an unreadable
    checkpoint, a file that cannot be loaded back or a failed parity check (the file is kept).
    `threads` and `spin` are passed to the `DetectBackend`s that check the files. `gate=False` skips
    the INT8 accuracy check (for callers that validate the files themselves).
    """
    include = list(dict.fromkeys(f.lower() for f in include))
    _check_args(include, batch_size, opset, int8, data, half)
    wrapper, ckpt = _load_model(weights)
    strides = [float(s) for s in wrapper.model.detect.stride.tolist()]
    hw = (int(imgsz[0]), int(imgsz[-1])) if isinstance(imgsz, (list, tuple)) else (int(imgsz), int(imgsz))
    if hw[0] % max(strides) or hw[1] % max(strides):
        raise ExportError(f"--imgsz {hw[0]} {hw[1]}: must be multiples of the model stride {int(max(strides))}")
    names = [str(n) for n in ckpt["names"]]
    calib = calibration_batches(data, hw, calib_images, batch_size) if int8 else None
    x = reference_batch(hw, batch_size, check_image)
    with torch.inference_mode():
        ref = wrapper(x)
    weights, outdir = Path(weights), Path(outdir) if outdir else Path(weights).parent
    opts = {"opset": opset, "dynamic": dynamic, "simplify": simplify, "half": half, "keep_head_float": keep_head_float}
    files: dict[str, Path] = {}
    for fmt in include:
        t0 = time.perf_counter()
        # a traced TorchScript module keeps sizes symbolic, so it is always shape-generic
        meta = export_metadata(names, strides, hw, batch_size, dynamic or fmt == "torchscript",
                               anchors=wrapper.model.detect.anchors)
        file = _write(fmt, wrapper, x, weights, outdir, meta, opts)
        parity = compare(fmt, ref, _load_back(file, threads, spin)(x))
        print(f"{fmt}: {file} ({export_size(file) / 1e6:.2f} MB, {time.perf_counter() - t0:.1f}s); {parity}")
        if not parity.ok and not (half and fmt == "openvino"):
            raise ExportError(f"{file}: export does not match PyTorch: {parity}")
        files[fmt] = file
        if calib is not None and fmt in INT8_FORMATS:
            q = _write(fmt, wrapper, x, weights, outdir, meta, opts, calib)
            _load_back(q, threads, spin)  # refuse a file the runtime cannot read before spending a val run
            ratio = export_size(q) / export_size(file)
            where = f" --dir {outdir}" if outdir != weights.parent else ""
            why = f"; where the bytes go: python benchmarks/int8_size.py --weights {weights}{where}" \
                if ratio > MAX_INT8_SIZE else ""  # per-channel tables and the graph do not shrink
            print(f"{fmt} INT8: {q} ({export_size(q) / 1e6:.2f} MB, {ratio:.2f}x the float32 size, "
                  f"{time.perf_counter() - t0:.1f}s){why}")
            if gate:  # benchmarks/formats.py scores every file itself
                int8_gate(file, q, data, hw[0], threads=threads, spin=spin)
            files[f"{fmt}-int8"] = q
    return files


@dataclass
class Gate:
    """fp32 vs INT8 accuracy of one export on the data's val split."""

    fp32: Metrics
    int8: Metrics

    @property
    def drop(self) -> float:
        """mAP50-95 lost by INT8 (positive = worse)."""
        return float(self.fp32.map - self.int8.map)

    @property
    def ok(self) -> bool:
        return self.drop <= MAX_INT8_DROP


def export_map(file: str | Path, data: str | Path, imgsz: int, threads: int | None = None, spin: bool = True,
               batch_size: int = 8) -> Metrics:
    """mAP of exactly `file` (any format DetectBackend reads) on the val split of `data`, as val.py scores it."""
    backend = _load_back(Path(file), threads, spin)
    cfg = check_dataset(data)
    if not cfg.val:
        raise ExportError(f"{cfg.yaml_file}: no 'val' split to check the export on")
    loader, _ = create_dataloader(cfg.val, imgsz if backend.dynamic else backend.imgsz[0], batch_size,
                                  stride=backend.stride, rect=False, workers=0, nc=cfg.nc, prefix="val: ")
    return evaluate(backend, loader, cfg.names)


def int8_gate(fp32_file: Path, int8_file: Path, data: str | Path, imgsz: int, threads: int | None = None,
              spin: bool = True) -> Gate:
    """Validate both files on `data`'s val split, print mAP50 and mAP50-95 side by side, and warn loudly
    when INT8 loses more than `MAX_INT8_DROP` mAP50-95. Returns the `Gate`."""
    gate = Gate(export_map(fp32_file, data, imgsz, threads, spin), export_map(int8_file, data, imgsz, threads, spin))
    print(f"{'INT8 check on ' + Path(str(data)).name + ' val':<44}{'mAP50':>8}{'mAP50-95':>10}")
    for name, m in ((fp32_file.name, gate.fp32), (int8_file.name, gate.int8)):
        print(f"  {name:<42}{m.map50:>8.3f}{m.map:>10.3f}")
    if gate.ok:
        print(f"  INT8 mAP50-95 change {-gate.drop:+.3f} (limit -{MAX_INT8_DROP})")
    else:
        bar = "!" * 100
        LOGGER.warning(f"{bar}\nWARNING: {int8_file}: INT8 loses {gate.drop:.3f} mAP50-95 against float32 "
                       f"(limit {MAX_INT8_DROP}); try more --calib-images or ship the float32 export\n{bar}")
    return gate


def main(argv: list[str] | None = None) -> int:
    """CLI entry: parse, apply the runtime policy once, export. Errors propagate (`cli_main` prints them)."""
    parser = argparse.ArgumentParser(description="Export a MobileYOLO checkpoint for deployment.")
    parser.add_argument("--weights", required=True, help="checkpoint (.pt) to export")
    parser.add_argument("--include", nargs="+", default=["onnx", "torchscript"], choices=FORMATS,
                        help="formats to write")
    parser.add_argument("--imgsz", "--img", "--img-size", nargs="+", type=int, default=[320],
                        help="input size: one value (square) or h w")
    parser.add_argument("--batch-size", type=int, default=1, help="batch size of the exported input")
    parser.add_argument("--dynamic", action="store_true",
                        help="ONNX/OpenVINO: symbolic batch/height/width axes (TorchScript is always shape-generic)")
    parser.add_argument("--simplify", action="store_true", help="run onnxsim on the ONNX graph if installed")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset version")
    parser.add_argument("--half", action="store_true", help="OpenVINO: fp16 weights, reduced precision at run time")
    parser.add_argument("--int8", action="store_true",
                        help="also write INT8 exports (onnx, openvino, tflite, executorch); needs --data")
    parser.add_argument("--data", default=None, help="data YAML: INT8 calibration (train) and check (val)")
    parser.add_argument("--calib-images", type=int, default=DEFAULT_IMAGES, help="INT8 calibration images")
    parser.add_argument("--check-image", default=None, help="image for the PyTorch parity check")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    policy = apply_policy(threads=None)
    files = run(args.weights, args.include, args.imgsz, args.batch_size, args.dynamic, args.simplify,
                args.opset, args.check_image, spin=policy.spin, half=args.half, int8=args.int8, data=args.data,
                calib_images=args.calib_images)
    print("Export done: " + ", ".join(str(f) for f in files.values()))
    print(f"Use: python detect.py --weights {next(iter(files.values()))}")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main("export.py", main))
