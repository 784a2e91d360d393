"""Train a MobileYOLO detector on a YOLO-format dataset, on one device or many with torchrun.

    python train.py                                   # MobileNetV3-Small-YOLO on bundled BCCD, 320 px, CPU
    python train.py --data my.yaml --cfg models/yolov5n.yaml --epochs 100 --device 0
    python train.py --resume runs/train/exp/weights/last.pt
    torchrun --nproc_per_node 2 train.py --device 0,1 --batch-size 64

The default hyp file, data/hyps/short-cpu.yaml, is tuned for that short CPU run (AdamW via
`--optimizer auto`); pass `--hyp data/hyps/default.yaml` for YOLOv5's long-schedule values (SGD).
Outputs go to runs/train/expN/: weights/{last,best}.pt, results.csv, results.png, hyp.yaml, args.yaml,
data plots and the final validation plots of best.pt. Ctrl-C stops after the current batch, saves a resumable
last.pt and prints the --resume command (exit 130); docs/RELIABILITY.md lists what each fault leaves.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from models.checkpoint import model_from_checkpoint
from utils.accel import accelerate
from utils.core.devices import device_memory_str, select_device
from utils.core.errors import FlagError, cli_main
from utils.data import check_dataset
from utils.data.plots import plot_labels, plot_train_batch
from utils.eval.evaluator import evaluate
from utils.eval.metrics import Metrics
from utils.train.autoanchor import autoanchor
from utils.train.config import DEFAULT_EPOCHS, TrainConfig, write_yaml
from utils.train.dist import (DistInfo, any_rank, broadcast_flag, cleanup_distributed, dist_from_env,
                              init_distributed, seed_everything)
from utils.train.ema import ModelEMA, de_parallel
from utils.train.faults import NonFiniteGuard, StopRequest, check_writable, write_checkpoint
from utils.train.files import DiskFullError, disk_full_error, is_disk_full
from utils.train.loss import ComputeLoss
from utils.train.optim import (BN_MOMENTUM, accumulate_steps, apply_warmup, build_optimizer, build_scheduler, lr_lambda,
                               scaled_weight_decay, set_bn_momentum, warmup_iters)
from utils.train.results import RESULT_COLUMNS, append_results, epoch_desc, epoch_header, plot_results, truncate_results
from utils.train.setup import (build_loaders, build_model, make_checkpoint, prepare_hyp, repo_path, resolve_resume,
                               strip_optimizer)
from utils.train.state import Callbacks, Run, interrupt_run, make_save_dir

GRAD_CLIP = 10.0  # max gradient norm; guards the first noisy steps against blow-ups


def setup(cfg: TrainConfig, info: DistInfo, device: torch.device, callbacks: Callbacks) -> Run:
    """Resume lookup, run folder, data, model, AutoAnchor, optimizer, schedule, EMA and loss."""
    cfg, ckpt = resolve_resume(cfg)
    if info.is_main and ckpt is None:  # before any work: a read-only --project fails here, not after the scan
        check_writable(Path(cfg.project), "--project")
    elif info.is_main:
        check_writable(Path(cfg.save_dir) / "weights", "run folder",
                       "copy the run folder to a writable place and resume its weights/last.pt there")
    seed_everything(cfg.seed, info.rank)
    hyp = prepare_hyp(cfg, ckpt)
    data = check_dataset(repo_path(cfg.data))
    cfg.data = str(data.yaml_file)  # absolute in args.yaml and checkpoints: --resume works from any folder
    if ckpt is None and Path(repo_path(cfg.cfg)).is_file():
        cfg.cfg = str(Path(repo_path(cfg.cfg)).resolve())
    nc, names = (1, ["item"]) if cfg.single_cls else (data.nc, list(data.names))
    model = build_model(cfg, nc, names, ckpt, device)
    gs = max(int(model.stride.max()), 32)
    if cfg.imgsz % gs:
        raise FlagError(f"--imgsz {cfg.imgsz} must be a multiple of the model's max stride {gs}")
    # the one place the CPU training kernels enter the model (utils/accel/swap.py): eligible blocks get a
    # forward on the mobileyolo:: ops in train mode; copies (EMA), checkpoints and eval stay plain PyTorch
    accelerate(model, enabled=cfg.accel, log=print if info.is_main else (lambda line: None))
    train_loader, train_ds, val_loader = build_loaders(cfg, data, hyp, gs, info)
    save_dir = make_save_dir(cfg, info)  # only now: bad input (an unusable dataset too) leaves no empty run folder
    if info.is_main and ckpt is None and not cfg.noautoanchor:
        det = model.detect
        new, _ = autoanchor(train_ds, det.anchors, det.stride, cfg.imgsz, thr=hyp["anchor_t"], seed=cfg.seed)
        if new is not None:
            det.anchors.copy_(new)  # a buffer: saved in every state_dict, so checkpoints carry the new anchors
    nbs = int(hyp.get("nbs", 64))
    accumulate = accumulate_steps(cfg.batch_size, nbs)
    wd = scaled_weight_decay(hyp["weight_decay"], cfg.batch_size, accumulate, nbs)
    set_bn_momentum(model, float(hyp.get("bn_momentum", BN_MOMENTUM)))
    opt_name = cfg.optimizer if cfg.optimizer != "auto" else str(hyp.get("optimizer", "SGD"))
    optimizer = build_optimizer(model, opt_name, hyp["lr0"], hyp["momentum"], wd)
    start_epoch, best_fitness, best_epoch = 0, 0.0, -1
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch = int(ckpt["epoch"]) + 1
        best_fitness, best_epoch = float(ckpt.get("best_fitness", 0.0)), int(ckpt.get("best_epoch", -1))
    lf = lr_lambda(cfg.epochs, hyp["lrf"], cfg.cos_lr)
    scheduler = build_scheduler(optimizer, cfg.epochs, hyp["lrf"], cfg.cos_lr, start_epoch)
    ema = ModelEMA(model) if info.is_main else None
    if ema is not None and ckpt is not None and ckpt.get("ema") is not None:
        ema.load_state_dict(ckpt["ema"], updates=int(ckpt.get("updates", 0)))
    if info.distributed:
        if cfg.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        # DDP broadcasts rank 0's buffers (AutoAnchor's anchors included) when it wraps the model.
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    det = de_parallel(model).detect
    loss_fn = ComputeLoss(det.anchors, det.stride, nc, hyp, imgsz=cfg.imgsz)
    nb = len(train_loader)
    nw = warmup_iters(hyp.get("warmup_epochs", 0.0), nb, int(hyp.get("warmup_min_iters", 100)))
    nw = min(nw, max(cfg.epochs * nb // 2, 1))  # never warm up for more than half of the run
    return Run(cfg=cfg, info=info, device=device, hyp=hyp, names=names, model=model, ema=ema,
               optimizer=optimizer, scheduler=scheduler, scaler=torch.amp.GradScaler("cuda", enabled=device.type == "cuda"),
               loss_fn=loss_fn, train_loader=train_loader, train_ds=train_ds, val_loader=val_loader,
               save_dir=save_dir, lf=lf, accumulate=accumulate, nw=nw, start_epoch=start_epoch,
               best_fitness=best_fitness, best_epoch=best_epoch, last_opt_step=start_epoch * nb - 1,
               callbacks=callbacks, guard=NonFiniteGuard(cfg.nan_limit, verbose=info.is_main))


def optimizer_step(r: Run) -> bool:
    """Unscale, clip, step, zero the gradients and update the EMA; False (gradients dropped, no step, no
    EMA update) when the gradient norm is not finite without AMP (AMP's scaler skips such steps itself)."""
    r.scaler.unscale_(r.optimizer)
    norm = torch.nn.utils.clip_grad_norm_(r.model.parameters(), max_norm=GRAD_CLIP)
    if not r.scaler.is_enabled() and not torch.isfinite(norm):
        r.optimizer.zero_grad(set_to_none=True)
        return False
    r.scaler.step(r.optimizer)
    r.scaler.update()
    r.optimizer.zero_grad(set_to_none=True)
    if r.ema is not None:
        r.ema.update(r.model)
    return True


def train_one_epoch(r: Run, epoch: int) -> tuple[torch.Tensor, int | None]:
    """One pass over the training set: (mean (box, obj, cls) loss per image [3], None), or (..., i) when
    Ctrl-C stopped it after batch i. A batch whose loss (or gradient) is not finite is skipped with a
    warning (`r.guard`: NonFiniteLossError after `--nan-limit` in a row)."""
    r.model.train()
    if hasattr(r.train_ds, "set_epoch"):
        r.train_ds.set_epoch(epoch)
    nb = len(r.train_loader)
    pbar: Any = enumerate(r.train_loader)
    if r.info.is_main:
        print("\n" + epoch_header())
        pbar = tqdm(pbar, total=nb, bar_format="{l_bar}{bar:10}{r_bar}")
    mloss, n_ok = torch.zeros(3), 0
    for i, (imgs, targets, paths, _shapes) in pbar:
        ni = i + nb * epoch  # iterations since the start of training
        if r.info.is_main and ni < 3 and not r.cfg.noplots:
            _plot_batch(r, ni, imgs, targets, paths)
        apply_warmup(r.optimizer, ni, r.nw, r.lf(epoch), r.hyp)
        imgs = (imgs.to(r.device, non_blocking=True).float() / 255).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=r.device.type, enabled=r.amp):
            loss, parts = r.loss_fn(r.model(imgs), targets.to(r.device))
        where = f"epoch {epoch + 1}/{r.cfg.epochs} batch {i + 1}/{nb}"
        finite = bool(torch.isfinite(loss))
        if any_rank(not finite, r.info):  # every rank skips, or none waits forever
            # no backward: nothing reaches the weights, the optimizer, the EMA or the AMP scaler
            r.guard.bad(where, "loss is not finite on another process" if finite else f"loss is {loss.item()}")
        else:
            if r.info.distributed:
                loss = loss * r.info.world_size  # DDP averages gradients over ranks; keep the full-batch scale
            r.scaler.scale(loss).backward()
            r.guard.good()
            if ni - r.last_opt_step >= r.accumulate:
                if not optimizer_step(r):
                    r.guard.bad(where, "the gradient is not finite")
                r.last_opt_step = ni
            mloss, n_ok = (mloss * n_ok + parts.detach().cpu()) / (n_ok + 1), n_ok + 1
        if r.info.is_main:
            pbar.set_description(epoch_desc(epoch, r.cfg.epochs, device_memory_str(r.device), mloss.tolist(),
                                             int(targets.shape[0]), int(imgs.shape[-1])))
        r.emit("on_train_batch_end", epoch, i)
        if r.stop is not None and r.stop.requested:
            if r.info.is_main:
                pbar.close()
            return mloss, i
    return mloss, None


def validate(r: Run, model: nn.Module, plots: bool = False, verbose: bool = False) -> Any:
    """`evaluate` on the validation loader with the training loss for val losses; returns Metrics."""
    return evaluate(model, r.val_loader, r.names, device=r.device, save_dir=r.save_dir, plots=plots,
                    verbose=verbose, loss_fn=r.loss_fn, half=False, single_cls=r.cfg.single_cls)


def end_epoch(r: Run, epoch: int, mloss: torch.Tensor, lrs: list[float]) -> bool:
    """Validate (unless --noval), write the results row and checkpoints; return the early-stop decision."""
    final = epoch + 1 == r.cfg.epochs
    metrics = validate(r, r.ema.ema) if (not r.cfg.noval or final) else Metrics()
    fi = metrics.fitness()
    if fi >= r.best_fitness or r.best_epoch < 0:
        r.best_fitness, r.best_epoch = max(fi, r.best_fitness), epoch
    vloss = list(metrics.loss) if metrics.loss is not None else [math.nan] * 3
    values = [epoch, *mloss.tolist(), metrics.p, metrics.r, metrics.map50, metrics.map, *vloss,
              *(lrs + [math.nan] * 3)[:3]]
    row = dict(zip(RESULT_COLUMNS, values))
    csv_path = r.save_dir / "results.csv"
    append_results(csv_path, row)  # before the checkpoint: a resume drops rows of unfinished epochs
    if r.tb is not None:
        for k, v in row.items():
            r.tb.add_scalar(k, v, epoch)
    if not r.cfg.nosave or final:
        ckpt = make_checkpoint(r.model, r.ema, r.optimizer, r.hyp, r.cfg, epoch, r.best_fitness, r.best_epoch)
        last = r.weights_dir / "last.pt"
        write_checkpoint(ckpt, last, resume_from=last)  # a full disk: DiskFullError, the old last.pt kept
        r.guard.last_good = f"{last} (epoch {epoch + 1})"
        if r.best_epoch == epoch:
            write_checkpoint(ckpt, r.weights_dir / "best.pt", resume_from=last)
        if r.cfg.save_period > 0 and (epoch + 1) % r.cfg.save_period == 0:
            write_checkpoint(ckpt, r.weights_dir / f"epoch{epoch + 1}.pt", resume_from=last)
    r.emit("on_fit_epoch_end", epoch, row)
    stop = r.cfg.patience > 0 and epoch - r.best_epoch >= r.cfg.patience
    if stop:
        print(f"Stopping early: no improvement in the last {r.cfg.patience} epochs (best epoch {r.best_epoch + 1}, "
              f"fitness {r.best_fitness:.4f}). Change --patience to train longer.")
    return stop


def fit(r: Run) -> int:
    """The epoch loop; returns the index of the last epoch run. Ctrl-C ends it through `interrupt_run`."""
    epoch = r.start_epoch - 1
    for epoch in range(r.start_epoch, r.cfg.epochs):
        mloss, stopped_after = train_one_epoch(r, epoch)
        if stopped_after is not None:
            interrupt_run(r, epoch - 1, f"in epoch {epoch + 1}/{r.cfg.epochs} after batch {stopped_after + 1}/"
                                    f"{len(r.train_loader)}")
        lrs = [g["lr"] for g in r.optimizer.param_groups]
        r.scheduler.step()
        stop = end_epoch(r, epoch, mloss, lrs) if r.info.is_main else False
        if r.stop is not None and r.stop.requested and epoch + 1 < r.cfg.epochs and not stop:
            interrupt_run(r, epoch, f"after epoch {epoch + 1}/{r.cfg.epochs}")  # pressed during validation
        if broadcast_flag(stop, r.info):
            break
    return epoch


def finish(r: Run, last_epoch: int, t0: float) -> Any:
    """Plot results, strip optimizers, validate best.pt with plots, and print where everything went."""
    n_done = last_epoch - r.start_epoch + 1
    print(f"\n{n_done} epochs completed in {(time.time() - t0) / 3600:.3f} hours.")
    if r.guard.skipped:
        print(f"{r.guard.skipped} training steps skipped for a non-finite loss or gradient: see the warnings above")
    for split, ds in (("train", r.train_ds), ("val", getattr(r.val_loader, "dataset", None))):
        if getattr(ds, "skip_note", ""):
            print(f"{split} data: {ds.skip_note}")
    if (r.save_dir / "results.csv").exists():
        plot_results(r.save_dir / "results.csv")
    metrics = None
    for name in ("last.pt", "best.pt"):
        f = r.weights_dir / name
        if f.exists():
            strip_optimizer(f)
    best = r.weights_dir / "best.pt"
    if best.exists():
        print(f"\nValidating {best}...")
        model = model_from_checkpoint(best).to(r.device)
        metrics = validate(r, model, plots=not r.cfg.noplots, verbose=True)
    print(f"Results saved to {r.save_dir}\n  weights: {r.weights_dir / 'best.pt'} (best), "
          f"{r.weights_dir / 'last.pt'} (last)\n  table: {r.save_dir / 'results.csv'}, plot: {r.save_dir / 'results.png'}")
    return metrics


def _start_outputs(r: Run) -> None:
    """Rank 0, before epoch 1: args.yaml, hyp.yaml, label plots, optional TensorBoard, a header line."""
    if not r.cfg.resume:
        write_yaml(r.save_dir / "hyp.yaml", r.hyp)
        write_yaml(r.save_dir / "args.yaml", r.cfg.to_dict())
        if not r.cfg.noplots:
            _plot_labels(r)
    else:
        kept = truncate_results(r.save_dir / "results.csv", r.start_epoch)
        for tmp in r.weights_dir.glob(".*.tmp"):  # left by a crash inside save_checkpoint
            tmp.unlink(missing_ok=True)
        print(f"Resuming {r.save_dir} from epoch {r.start_epoch + 1}/{r.cfg.epochs} ({kept} results rows kept)")
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional; needs the tensorboard package

        r.tb = SummaryWriter(str(r.save_dir))
    except ImportError:
        r.tb = None
    opt = type(r.optimizer).__name__
    print(f"Image size {r.cfg.imgsz}, {len(r.train_ds)} train images, batch {r.cfg.batch_size} "
          f"(accumulate {r.accumulate}), {opt} lr0 {r.hyp['lr0']:g}, {r.cfg.workers} workers, on {r.device}. "
          f"Logging to {r.save_dir}")


def _plot_labels(r: Run) -> None:
    """labels.jpg: class counts, box centres and sizes of the training labels."""
    plot_labels(r.train_ds.labels, r.names, r.save_dir)


def _plot_batch(r: Run, ni: int, imgs: torch.Tensor, targets: torch.Tensor, paths: list[str]) -> None:
    """train_batch{ni}.jpg for the first 3 batches of a fresh run: what the augmentation feeds the model."""
    plot_train_batch(imgs, targets, paths, r.save_dir / f"train_batch{ni}.jpg", names=r.names)


def run(opt: TrainConfig | None = None, callbacks: Callbacks | None = None, **kwargs: Any) -> dict[str, Any]:
    """Train; return `{'save_dir', 'best', 'last', 'metrics', 'epochs_done'}` (rank 0; others get save_dir None).

    Instead of `opt`, TrainConfig fields may be given as keyword arguments (`run(data=..., epochs=3)`).
    `callbacks` maps event names to functions: `on_train_batch_end(epoch, i)` and
    `on_fit_epoch_end(epoch, row)` (tests use them to interrupt runs at chosen points).
    """
    if opt is not None and kwargs:
        raise TypeError("run(): pass either a TrainConfig or keyword arguments, not both")
    cfg = opt or TrainConfig(**kwargs)
    info = dist_from_env()
    device = select_device(cfg.device, info.local_rank)
    init_distributed(info, device)
    r = None
    try:
        r = setup(cfg, info, device, callbacks or {})
        if info.is_main:
            _start_outputs(r)
        t0 = time.time()
        # under torchrun Ctrl-C stops at once (ranks would have to agree on the batch); last.pt is then the
        # previous epoch's
        with StopRequest(enabled=not info.distributed) as r.stop:
            epoch = fit(r)
        metrics = finish(r, epoch, t0) if info.is_main else None
    except OSError as e:  # a full disk in a write not made through utils/train/files.py (plots, TensorBoard)
        if is_disk_full(e) and not isinstance(e, DiskFullError):
            raise disk_full_error(e.filename or f"a file of the run {cfg.save_dir or cfg.project}") from None
        raise
    finally:
        if r is not None and r.tb is not None:
            r.tb.close()
        cleanup_distributed()
    wd = r.save_dir / "weights" if r.save_dir else None
    return {"save_dir": r.save_dir, "best": wd / "best.pt" if wd else None, "last": wd / "last.pt" if wd else None,
            "metrics": metrics, "epochs_done": epoch + 1}


def parse_opt(argv: list[str] | None = None) -> TrainConfig:
    """Command line -> TrainConfig; flags have the names YOLOv5 users type (`python train.py --help`)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = TrainConfig.__dataclass_fields__
    p.add_argument("--data", default=None, help=f"data YAML (default {d['data'].default}); with --resume: the "
                   "run's data YAML at a new place")
    p.add_argument("--cfg", default=d["cfg"].default, help="model YAML")
    p.add_argument("--weights", default="", help="start from this MobileYOLO checkpoint (matching tensors)")
    p.add_argument("--backbone-weights", default="", help="torchvision MobileNetV3 state_dict file for the backbone")
    p.add_argument("--hyp", default=d["hyp"].default, help="hyper-parameter YAML (data/hyps/default.yaml: YOLOv5's)")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    p.add_argument("--batch-size", type=int, default=16, help="total batch over all processes")
    p.add_argument("--imgsz", "--img", "--img-size", type=int, default=320, help="train and val image size (px)")
    p.add_argument("--device", default="cpu", help="cpu, 0, 0,1 or '' (auto)")
    p.add_argument("--workers", type=int, default=2, help="dataloader workers per process")
    p.add_argument("--cache", nargs="?", const="ram", default=None, help="cache images in RAM")
    p.add_argument("--rect", action="store_true", help="rectangular training batches (no shuffle)")
    p.add_argument("--patience", type=int, default=100, help="early stop after this many epochs without improvement")
    p.add_argument("--nan-limit", type=int, default=d["nan_limit"].default,
                   help="stop after this many steps in a row skipped for a non-finite loss")
    p.add_argument("--resume", nargs="?", const=True, default=False, help="resume the run of this last.pt (or the latest)")
    p.add_argument("--freeze", type=int, default=0, help="freeze the first N model rows")
    p.add_argument("--optimizer", choices=["auto", "SGD", "Adam", "AdamW"], default="auto",
                   help="auto: the hyp file's `optimizer` key, else SGD")
    p.add_argument("--cos-lr", action="store_true", help="cosine LR decay instead of linear")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--single-cls", action="store_true", help="train every class as one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--project", default="runs/train")
    p.add_argument("--name", default="exp")
    p.add_argument("--exist-ok", action="store_true", help="reuse project/name instead of incrementing")
    p.add_argument("--noval", action="store_true", help="validate only after the final epoch")
    p.add_argument("--nosave", action="store_true", help="write checkpoints only after the final epoch")
    p.add_argument("--save-period", type=int, default=-1, help="also keep epochN.pt every N epochs")
    p.add_argument("--noautoanchor", action="store_true", help="keep the YAML anchors")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm under torchrun")
    p.add_argument("--noplots", action="store_true", help="skip the data and validation plots")
    p.add_argument("--no-accel", dest="accel", action="store_false",
                   help="plain PyTorch training, without our CPU training kernels (also: MOBILEYOLO_CPU_KERNELS=0)")
    args = vars(p.parse_args(argv))
    if args["data"] is None:
        args["data"] = d["data"].default
    elif args["resume"]:
        args["resume_data"] = args["data"]
    return TrainConfig(**args)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI entry: parse the flags and train. Errors propagate (`cli_main` prints a `UserError` as one line)."""
    return run(parse_opt(argv))


if __name__ == "__main__":
    sys.exit(cli_main("train.py", main))
