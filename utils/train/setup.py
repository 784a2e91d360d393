"""Pieces train.py assembles before the first epoch: resume lookup, hyper-parameters, model and weights,
and the checkpoint dict written after each epoch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.checkpoint import CheckpointError, foreign_format, load_checkpoint
from models.pretrained import load_torchvision_backbone
from models.registry import ModelConfigError
from models.yolo import Model
from utils.core.errors import FlagError, MissingFileError
from utils.core.paths import ROOT
from utils.data import create_dataloader, load_hyp
from utils.train.config import TrainConfig
from utils.train.dist import main_process_first
from utils.train.ema import de_parallel
from utils.train.faults import write_checkpoint
from utils.train.optim import freeze_layers


def repo_path(p: str | Path) -> str:
    """`p` as given when it exists, else the same relative path under the repository root when that
    exists (so the default `data/...` and `models/...` files work from any working directory)."""
    p = Path(p)
    if not p.exists() and not p.is_absolute() and (ROOT / p).exists():
        return str(ROOT / p)
    return str(p)


def find_last_checkpoint(project: str | Path) -> Path:
    """The most recently written `last.pt` under `project` (for a bare `--resume`)."""
    candidates = sorted(Path(project).rglob("last.pt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise MissingFileError(f"--resume: no last.pt found under {project}; pass the checkpoint path")
    return candidates[-1]


def resolve_resume(cfg: TrainConfig) -> tuple[TrainConfig, dict | None]:
    """For `--resume [path]`: the run's own args from the checkpoint, and the checkpoint; else `(cfg, None)`.

    The run folder is taken from where the checkpoint lies (`<run>/weights/last.pt`), so a run folder
    that was moved still resumes in place. Raises CheckpointError for a finished run or a stripped
    checkpoint (no optimizer state), MissingFileError (a FileNotFoundError) when there is nothing to resume.
    """
    if not cfg.resume:
        return cfg, None
    path = find_last_checkpoint(cfg.project) if cfg.resume is True else Path(str(cfg.resume))
    ckpt = load_checkpoint(path)
    args = ckpt.get("args")
    if not isinstance(args, dict):
        raise CheckpointError(f"{path}: has no training args; it cannot be resumed (start a new run with --weights)")
    new = TrainConfig.from_dict(args, source=str(path))
    new.resume, new.save_dir = str(path), str(path.resolve().parent.parent)
    new.accel = new.accel and cfg.accel  # --no-accel is how this process runs, not part of the run's recipe
    new.data, new.resume_data = _resume_data(path, new.data, cfg.resume_data), ""
    if ckpt.get("optimizer") is None:
        raise CheckpointError(f"{path}: training already finished (epoch {int(ckpt.get('epoch', -1)) + 1} of "
                              f"{new.epochs}); nothing to resume. Start a new run with --weights {path}")
    if int(ckpt.get("epoch", -1)) + 1 >= new.epochs:
        raise CheckpointError(f"{path}: all {new.epochs} epochs are done; nothing to resume")
    print(f"--resume {path}: continuing with the run's own arguments (other flags but --no-accel and --data "
          f"are ignored)")
    return new, ckpt


def _resume_data(ckpt_path: Path, run_data: str, given: str) -> str:
    """The data YAML a resumed run uses: `given` (--data with --resume) when set, else the run's own one,
    which must still exist (MissingFileError saying how to point at its new place otherwise)."""
    if given:
        if not Path(repo_path(given)).is_file():
            raise MissingFileError(f"--data {given}: file not found")
        if str(Path(repo_path(given)).resolve()) != str(run_data):
            print(f"--resume {ckpt_path}: data YAML {run_data} replaced by --data {given}")
        return str(Path(repo_path(given)).resolve())
    if not Path(repo_path(run_data)).is_file():
        raise MissingFileError(f"--resume {ckpt_path}: the run's data YAML {run_data} is missing (moved or deleted); "
                               f"put it back, or pass its new place: python train.py --resume {ckpt_path} --data NEW.yaml")
    return run_data


def prepare_hyp(cfg: TrainConfig, ckpt: dict | None) -> dict[str, Any]:
    """Hyper-parameters: the checkpoint's on resume, else the hyp file/dict, then `hyp_overrides` and
    `--label-smoothing` (when > 0) on top."""
    if ckpt is not None and isinstance(ckpt.get("hyp"), dict):
        return dict(ckpt["hyp"])
    hyp = dict(cfg.hyp) if isinstance(cfg.hyp, dict) else load_hyp(repo_path(cfg.hyp))
    unknown = sorted(set(cfg.hyp_overrides) - set(hyp) - {"nbs", "warmup_min_iters", "bn_momentum", "optimizer"})
    if unknown:
        print(f"WARNING hyp_overrides: keys {unknown} are not in the hyp file; added anyway")
    hyp.update(cfg.hyp_overrides)
    if cfg.label_smoothing > 0:
        hyp["label_smoothing"] = cfg.label_smoothing
    return hyp


def build_loaders(cfg: TrainConfig, data: Any, hyp: dict, gs: int, info: Any) -> tuple[Any, Any, Any]:
    """(train_loader, train_dataset, val_loader or None); the batch is split across ranks."""
    if cfg.batch_size % info.world_size:
        raise FlagError(f"--batch-size {cfg.batch_size} must be a multiple of the {info.world_size} processes")
    bs = cfg.batch_size // info.world_size
    with main_process_first(info):  # rank 0 writes the label cache, the others then read it
        train_loader, train_ds = create_dataloader(
            data.train, cfg.imgsz, bs, gs, hyp=hyp, augment=True, cache=cfg.cache, rect=cfg.rect,
            workers=cfg.workers, shuffle=True, seed=cfg.seed, nc=data.nc, prefix="train: ",
            rank=info.rank, world_size=info.world_size)
    val_loader = None
    if info.is_main:
        val_loader, val_ds = create_dataloader(
            data.val, cfg.imgsz, bs * 2, gs, hyp=hyp, augment=False, cache=cfg.cache, rect=True,
            workers=cfg.workers, shuffle=False, seed=cfg.seed, nc=data.nc, prefix="val: ", pad=0.5)
    if cfg.single_cls:
        for ds in (train_ds, val_ds) if val_loader is not None else (train_ds,):
            single_class(ds)
    return train_loader, train_ds, val_loader


def single_class(dataset: Any) -> None:
    """--single-cls: every label becomes class 0 (the dataset reads `labels` on each item), so the
    training and validation losses see one class."""
    for lb in dataset.labels:
        lb[:, 0] = 0


def transfer_weights(model: nn.Module, path: str | Path) -> tuple[int, int]:
    """Load tensors of one of our checkpoints whose names and shapes match `model`; return (moved, total).

    Anchors are not transferred: they belong to the new YAML (and AutoAnchor). EMA weights are preferred.
    A file that is not our checkpoint (e.g. a torchvision state_dict) raises CheckpointError with a hint.
    """
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(f"{e} (--weights takes a MobileYOLO or YOLOv5 checkpoint; for a torchvision "
                              f"MobileNetV3 state_dict use --backbone-weights)") from None
    src = ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"]
    dst = model.state_dict()
    keep = {k: v for k, v in src.items()
            if k in dst and "anchors" not in k and tuple(v.shape) == tuple(dst[k].shape)}
    model.load_state_dict(keep, strict=False)
    return len(keep), len(dst)


def yolov5_cfg(cfg: TrainConfig) -> dict | None:
    """The model YAML of a YOLOv5 `--weights` file when `--cfg` is left at its default (as in YOLOv5,
    `train.py --weights yolov5s.pt` fine-tunes that architecture); None otherwise."""
    default = Path(repo_path(TrainConfig.cfg)).resolve()
    if not cfg.weights or Path(repo_path(cfg.cfg)).resolve() != default or foreign_format(cfg.weights) != "yolov5":
        return None
    yaml = load_checkpoint(cfg.weights)["yaml"]
    print(f"--weights {cfg.weights}: a YOLOv5 checkpoint; training its own model "
          f"({yaml.get('yaml_file', 'its YAML rows')}); pass --cfg to train another one")
    return yaml


def build_model(cfg: TrainConfig, nc: int, names: list[str], ckpt: dict | None, device: torch.device) -> nn.Module:
    """The detector to train, on `device`: from the checkpoint on resume, else from `cfg.cfg` with
    `--weights` or `--backbone-weights` loaded, and the first `--freeze` rows frozen."""

    if ckpt is not None:
        model = Model(ckpt["yaml"])
        model.load_state_dict(ckpt["model"], strict=True)
    else:
        model = Model(yolov5_cfg(cfg) or repo_path(cfg.cfg), nc=nc)
        if model.detect is None:
            raise ModelConfigError(f"--cfg {cfg.cfg}: has no Detect head (a classifier YAML); train.py trains detectors")
        if cfg.weights:
            n, total = transfer_weights(model, cfg.weights)
            print(f"Transferred {n}/{total} items from {cfg.weights}")
            if n == 0:
                print(f"WARNING --weights {cfg.weights}: no tensor matched this model; training from scratch")
        if cfg.backbone_weights:

            res = load_torchvision_backbone(model, cfg.backbone_weights)
            print(f"--backbone-weights {cfg.backbone_weights}: {res}")
            if not res.loaded:
                raise CheckpointError(f"--backbone-weights {cfg.backbone_weights}: no tensor fits {cfg.cfg} "
                                 f"(is it a MobileNetV3 model of the same size?)")
    model.names = list(names)
    if model.detect is not None and model.detect.nc != nc:
        src = cfg.resume if ckpt is not None else cfg.cfg
        raise CheckpointError(f"{src}: model has {model.detect.nc} classes but the dataset {cfg.data} has {nc}")
    if cfg.freeze:
        frozen = freeze_layers(model, cfg.freeze)
        print(f"Froze the first {cfg.freeze} rows ({len(frozen)} tensors)")
    # channels_last: MobileNetV3's depthwise convs train faster on CPU in NHWC (benchmarks/train_speed.py)
    return model.to(device, memory_format=torch.channels_last)


def make_checkpoint(model: nn.Module, ema: Any, optimizer: torch.optim.Optimizer | None, hyp: dict,
                    cfg: TrainConfig, epoch: int, best_fitness: float, best_epoch: int) -> dict[str, Any]:
    """The data-only checkpoint dict of docs/CONTRACTS.md (plus `best_epoch` for early stopping)."""
    m = de_parallel(model)
    args = cfg.to_dict()
    args["resume"] = False  # a checkpoint's args describe the original run
    return {
        "model": m.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "yaml": m.yaml, "names": list(m.names),
        "anchors": m.detect.anchors.detach().cpu().clone(), "stride": m.stride.detach().cpu().clone(),
        "hyp": hyp, "args": args, "epoch": int(epoch),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "best_fitness": float(best_fitness), "best_epoch": int(best_epoch),
        "updates": int(ema.updates) if ema is not None else 0,
    }


def strip_optimizer(path: str | Path) -> Path:
    """Rewrite a finished run's checkpoint without optimizer state (smaller; marks it as finished)."""
    ckpt = load_checkpoint(path)
    ckpt["optimizer"] = None
    return write_checkpoint(ckpt, path)
