"""Validate a detector: COCO-exact mAP, P/R/F1, speed, plots.

    python val.py --data data/bccd.yaml --weights runs/train/exp/weights/best.pt --imgsz 320

The loop itself is `utils.eval.evaluator.evaluate`; `run()` is the CLI body (weights of any format through
`utils.infer.backend.DetectBackend`); `main()` parses arguments. Outputs go to runs/val/expN.
`--task train|val|test` picks the split, `--task speed` times batch-1 inference (YOLOv5's flag);
`--save-json` on COCO writes COCO's ids and scores against the official annotation file (`_coco_mode`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from utils.core.devices import select_device
from utils.core.errors import FlagError, cli_main
from utils.core.paths import ROOT, increment_path
from utils.data import DataConfig, DataConfigError, check_dataset, create_dataloader
from utils.eval.coco import find_annotations, is_coco_names
from utils.eval.evaluator import evaluate
from utils.eval.metrics import Metrics
from utils.infer.backend import DetectBackend
from utils.infer.runtime import apply_policy

TASKS = ("train", "val", "test", "speed")


def _load_model(weights: str | Path, device: torch.device, spin: bool = True):
    """A `DetectBackend` for .pt/.torchscript/.onnx (decoded output), moved to `device` when it is torch."""
    backend = DetectBackend(weights, spin=spin)
    if device.type != "cpu":
        if backend.fmt != "pt":
            raise FlagError(f"{weights}: {backend.fmt} weights run on CPU only; use --device cpu")
        backend.model.to(device)
    return backend


def run(data: str | Path, weights: str | Path, imgsz: int = 320, batch_size: int = 16, conf_thres: float = 0.001,
        iou_thres: float = 0.6, max_det: int = 300, task: str = "val", device: str = "cpu", workers: int = 2,
        single_cls: bool = False, augment: bool = False, verbose: bool = False, save_txt: bool = False,
        save_conf: bool = False, save_json: bool = False, project: str | Path = ROOT / "runs/val", name: str = "exp",
        exist_ok: bool = False, half: bool = False, plots: bool = True, rect: bool | None = None,
        spin: bool = True) -> Metrics:
    """Validate `weights` on split `task` ('train', 'val' or 'test') of the data YAML; returns the Metrics.

    `task='speed'` (YOLOv5's speed benchmark): the val split at batch 1, conf 0.25, IoU 0.45, no plots or
    JSON, one warm-up call first; prints the ms per image of pre-process, inference and NMS.
    `save_json` on COCO (`_coco_mode`): COCO image/category ids, and pycocotools against the official
    annotation file when there is one; `Metrics.map50`/`map` are then pycocotools' figures (YOLOv5's rule).

    `rect`: rectangular batches sorted by aspect ratio (None: whenever the weights take any input shape;
    a fixed-size ONNX export always gets square letterboxed images, so compare it with `rect=False`).
    Results (plots, labels/, JSON) go to `project/name` (incremented: exp, exp2, ...). `spin`: whether
    ONNX Runtime's threads may spin-wait (`DetectBackend`). Raises a `UserError` subclass for bad
    arguments, data or weights (`FlagError`, `DataConfigError`, `BackendError`).
    """
    if task not in TASKS:
        raise FlagError(f"--task {task!r}: expected one of {', '.join(TASKS)}")
    if task == "speed":
        batch_size, conf_thres, iou_thres, plots, save_json = 1, 0.25, 0.45, False, False
    _check_values(imgsz=imgsz, batch_size=batch_size, conf_thres=conf_thres, iou_thres=iou_thres, max_det=max_det,
                  workers=workers)
    if augment:
        print("WARNING: --augment (test-time augmentation) is not supported; validating without it")
    cfg = check_dataset(data)
    split = "val" if task == "speed" else task
    sources = getattr(cfg, split)
    if not sources:
        raise DataConfigError(f"{cfg.yaml_file}: no '{split}' split defined (key '{split}'), needed by --task {task}")
    coco80, anno_json = _coco_mode(cfg, split, single_cls) if save_json else (False, None)
    dev = select_device(device)
    model = _load_model(weights, dev, spin=spin)
    if not single_cls and model.nc != cfg.nc:
        raise DataConfigError(f"{weights}: model has {model.nc} classes but {cfg.yaml_file} has {cfg.nc}; "
                              f"use matching data or --single-cls")
    if rect is None or not model.dynamic:
        rect = model.dynamic
    if not model.dynamic and model.imgsz[0] != imgsz:
        print(f"WARNING: {Path(weights).name} is a fixed {model.imgsz[0]}x{model.imgsz[1]} export; "
              f"--imgsz {imgsz} ignored")
        imgsz = model.imgsz[0]
    loader, dataset = create_dataloader(sources, imgsz, batch_size, stride=model.stride, rect=rect, workers=workers,
                                  pad=0.5 if rect else 0.0, nc=cfg.nc, prefix=f"{split}: ")
    save_dir = increment_path(Path(project) / name, exist_ok=exist_ok, mkdir=True)  # after every input check
    if task == "speed":
        model.warmup((imgsz, imgsz) if model.dynamic else None)
    m = evaluate(model, loader, cfg.names, conf_thres=conf_thres, iou_thres=iou_thres, max_det=max_det,
                 device=dev, save_dir=save_dir, plots=plots, verbose=verbose, half=half, single_cls=single_cls,
                 save_txt=save_txt, save_conf=save_conf, save_json=save_json, coco80=coco80, anno_json=anno_json)
    if task == "speed":  # the table's "Speed:" line holds the figures; say what they were measured on
        print(f"--task speed: {Path(weights).name} ({model.fmt}), {m.n_images} images of the val split, batch 1, "
              f"--imgsz {imgsz}{' (rectangular)' if rect else ''}, conf 0.25, IoU 0.45, after one warm-up call")
    outputs = sorted(p.name for p in save_dir.iterdir())
    print(f"Results saved to {save_dir}: {', '.join(outputs) if outputs else '(nothing)'}"
          + (f". {dataset.skip_note}" if dataset.skip_note else ""))  # '3 images skipped: see above'
    return m


def _coco_mode(cfg: DataConfig, split: str, single_cls: bool) -> tuple[bool, Path | None]:
    """(whether the JSON uses COCO's ids, the official annotation file or None) for `--save-json` on `split`.

    COCO ids: the data YAML's `coco: true/false`, else whether its names are COCO's 80 in COCO's order.
    Annotation file (val split only): the YAML's `annotations` (relative to `path`), else
    `path/annotations/instances_val2017.json` when it exists. Neither with `--single-cls`.
    """
    coco80 = cfg.coco if cfg.coco is not None else is_coco_names(cfg.names)
    if coco80 and cfg.nc != 80:
        raise DataConfigError(f"{cfg.yaml_file}: 'coco: true' needs COCO's 80 classes, got {cfg.nc} names")
    anno_json = find_annotations(cfg.path, cfg.annotations, split)
    if single_cls and (coco80 or anno_json):
        print("WARNING: --single-cls: the JSON keeps class 0 and image indices; no official annotation scoring")
        return False, None
    return coco80, anno_json


def _check_values(**values: float) -> None:
    """`FlagError` naming the flag for a value val.py cannot use (thresholds in 0..1, counts >= 1)."""
    for key, v in values.items():
        flag = "--" + key.replace("_", "-")
        if key.endswith("_thres") and not 0.0 <= v <= 1.0:
            raise FlagError(f"{flag} must be in 0..1, got {v}")
        if key == "workers" and v < 0:
            raise FlagError(f"{flag} must be >= 0, got {v}")
        if key in ("imgsz", "batch_size", "max_det") and v < 1:
            raise FlagError(f"{flag} must be >= 1, got {v}")


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Validate a MobileYOLO detector (COCO-exact mAP, plots).")
    p.add_argument("--data", type=str, default=str(ROOT / "data/bccd.yaml"), help="data YAML")
    p.add_argument("--weights", type=str, required=True, help="checkpoint .pt, .torchscript or .onnx")
    p.add_argument("--imgsz", "--img", "--img-size", type=int, default=320, help="inference size (pixels)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--conf-thres", type=float, default=0.001, help="confidence threshold")
    p.add_argument("--iou-thres", type=float, default=0.6, help="NMS IoU threshold")
    p.add_argument("--max-det", type=int, default=300, help="maximum detections per image")
    p.add_argument("--task", default="val", choices=list(TASKS),
                   help="split to evaluate (train, val, test), or speed: batch-1 timing at conf 0.25, IoU 0.45")
    p.add_argument("--device", default="cpu", help="cpu, 0, cuda:0 ...")
    p.add_argument("--workers", type=int, default=2, help="dataloader workers")
    p.add_argument("--single-cls", action="store_true", help="treat every class as one")
    p.add_argument("--augment", action="store_true", help="test-time augmentation (not supported; warns)")
    p.add_argument("--verbose", action="store_true", help="one table row per class")
    p.add_argument("--save-txt", action="store_true", help="save detections as YOLO label files")
    p.add_argument("--save-conf", action="store_true", help="add the confidence to --save-txt labels")
    p.add_argument("--save-json", action="store_true",
                   help="write COCO JSON (COCO's ids on COCO) and run pycocotools (against the official "
                        "annotation file when the data has one)")
    p.add_argument("--project", default=str(ROOT / "runs/val"), help="save to project/name")
    p.add_argument("--name", default="exp", help="save to project/name")
    p.add_argument("--exist-ok", action="store_true", help="reuse project/name instead of incrementing")
    p.add_argument("--half", action="store_true", help="FP16 inference (CUDA only)")
    p.add_argument("--noplots", action="store_true", help="do not write plots")
    p.add_argument("--square", action="store_true",
                   help="square letterboxed batches instead of rectangular ones (what a fixed-size export sees)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> Metrics:
    """CLI entry: parse, apply the runtime policy once, validate. Errors propagate (`cli_main` prints them)."""
    opt = vars(parse_opt(argv))
    opt["plots"] = not opt.pop("noplots")
    opt["rect"] = False if opt.pop("square") else None
    policy = apply_policy(threads=None)
    return run(**opt, spin=policy.spin)


if __name__ == "__main__":
    sys.exit(cli_main("val.py", main))
