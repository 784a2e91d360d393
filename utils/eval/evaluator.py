"""The evaluation loop shared by train.py (per-epoch validation) and val.py: COCO-exact mAP, P/R/F1, plots.

`evaluate(model, dataloader, names, ...) -> Metrics`; `model` is a torch `Model` (raw maps, decoded here)
or anything returning decoded `[B, N, 5+nc]` (a `DetectBackend`).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from utils.core.errors import first_line
from utils.eval.coco import image_ids, run_cocoeval, save_coco_json, score_official
from utils.eval.confusion import ConfusionMatrix
from utils.eval.metrics import Metrics, compute_metrics
from utils.eval.plots import (
    plot_conf_curves,
    plot_confusion_matrix,
    plot_pr_curve,
    plot_val_pairs,
)
from utils.ops.boxes import scale_boxes, xywhn2xyxy, xyxy2xywhn
from utils.ops.decode import decode
from utils.ops.nms import non_max_suppression

HEADER = ("%22s" + "%11s" * 6) % ("Class", "Images", "Instances", "P", "R", "mAP50", "mAP50-95")
ROW = "%22s" + "%11i" * 2 + "%11.3g" * 4
PLOT_BATCHES = 3  # validation batches drawn as GT|prediction pairs


def split_output(out, model) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """Model output -> (decoded `[B, N, 5+nc]`, raw maps or None).

    Raw maps (a list of 5-D tensors) are decoded with `model.detect.anchors` and `.stride`; a 3-D
    tensor (export backends) is already decoded; a tuple whose first item is 3-D is taken as decoded.
    """
    if isinstance(out, torch.Tensor) and out.dim() == 3:
        return out, None
    if isinstance(out, (list, tuple)) and out and all(isinstance(m, torch.Tensor) and m.dim() == 5 for m in out):
        det = getattr(model, "detect", None)
        if det is None:
            raise ValueError("evaluate: the model returned raw maps but has no `detect` head to decode them")
        return decode(list(out), det.anchors, det.stride), list(out)
    if isinstance(out, (list, tuple)) and out and isinstance(out[0], torch.Tensor) and out[0].dim() == 3:
        return out[0], None
    kind = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    raise ValueError(f"evaluate: model output must be raw maps or a decoded [B, N, 5+nc] tensor, got {kind}")


def _image_records(dets: list[torch.Tensor], targets: torch.Tensor, shapes: list, hw: tuple[int, int],
                   single_cls: bool) -> list[tuple[np.ndarray, np.ndarray, tuple[int, int]]]:
    """Per image: (detections [n, 6], labels [m, 5] cls+xyxy, (h0, w0)) in original-image pixels."""
    h, w = hw
    out = []
    for i, det in enumerate(dets):
        t = targets[targets[:, 0] == i].double()
        shape0, ratio_pad = (shapes[i] if shapes[i] is not None else ((h, w), None))
        p = det.detach().double().clone()
        scale_boxes((h, w), p[:, :4], shape0, ratio_pad)
        g = scale_boxes((h, w), xywhn2xyxy(t[:, 2:6], w, h), shape0, ratio_pad)
        cls = torch.zeros_like(t[:, 1]) if single_cls else t[:, 1]
        if single_cls:
            p[:, 5] = 0
        out.append((p.cpu().numpy(), torch.cat((cls[:, None], g), 1).cpu().numpy(), tuple(int(v) for v in shape0)))
    return out


def _save_txt(path: str, det: np.ndarray, shape0: tuple[int, int], labels_dir: Path, save_conf: bool) -> None:
    """YOLO label file of the detections: `cls cx cy w h [conf]` normalised to the original image."""
    xywhn = xyxy2xywhn(det[:, :4].copy(), w=shape0[1], h=shape0[0])
    lines = [f"{int(c)} " + " ".join(f"{v:.6g}" for v in (*b, *((s,) if save_conf else ())))
             for b, s, c in zip(xywhn, det[:, 4], det[:, 5])]
    (labels_dir / f"{Path(path).stem}.txt").write_text("".join(f"{ln}\n" for ln in lines))


def print_results(m: Metrics, names: list[str], verbose: bool) -> None:
    """The YOLOv5 table: an `all` row, and with `verbose` one row per class that has ground truth."""
    print(HEADER)
    print(ROW % ("all", m.n_images, int(m.nt.sum()), m.p, m.r, m.map50, m.map))
    if m.nt.sum() == 0:
        print("WARNING: no labels in this split; mAP, P and R cannot be computed and are reported as 0")
    if verbose:
        for i, c in enumerate(m.ap_class):
            print(ROW % (names[c], m.nimg_class[c], m.nt[c], m.p_class[i], m.r_class[i], m.ap50[i], m.ap[i]))
    s = m.speed
    print(f"Speed: {s['pre']:.1f}ms pre-process, {s['inf']:.1f}ms inference, {s['nms']:.1f}ms NMS per image")


def _finish_plots(m: Metrics, cm, names: list[str], save_dir: Path) -> None:

    plot_confusion_matrix(cm, names, save_dir)
    if m.curves:
        plot_pr_curve(m, names, save_dir)
        plot_conf_curves(m, names, save_dir)


@torch.no_grad()
def _run_batches(model, batches, device: torch.device, use_half: bool, loss_fn, nms_kw: dict):
    """Yield per batch `(imgs, targets (cpu), paths, shapes, (H, W), dets (cpu), times [3] s, loss parts or None)`."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for imgs, targets, paths, shapes in batches:
        t0 = time.perf_counter()
        x = imgs.to(device, non_blocking=True)
        x = (x.half() if use_half else x.float()) / 255
        sync()
        t1 = time.perf_counter()
        pred, maps = split_output(model(x), model)
        sync()
        t2 = time.perf_counter()
        parts = None
        if loss_fn is not None and maps is not None:  # the loss is not timed: it is not part of inference
            parts = loss_fn([m.float() for m in maps], targets.to(device))[1].detach().float().cpu()
        t3 = time.perf_counter()
        dets = [d.cpu() for d in non_max_suppression(pred.float(), **nms_kw)]
        times = np.array([t1 - t0, t2 - t1, time.perf_counter() - t3])
        yield imgs, targets.cpu(), paths, shapes, tuple(x.shape[2:]), dets, times, parts


@torch.no_grad()
def evaluate(model, dataloader, names: list[str], conf_thres: float = 0.001, iou_thres: float = 0.6,
             max_det: int = 300, device: str | torch.device = "cpu", save_dir: Path | None = None,
             plots: bool = False, verbose: bool = False, loss_fn=None, half: bool = False,
             single_cls: bool = False, save_txt: bool = False, save_conf: bool = False,
             save_json: bool = False, coco80: bool = False, anno_json: str | Path | None = None) -> Metrics:
    """Run `model` over `dataloader` batches (see docs/CONTRACTS.md) and score it -> `Metrics`.

    `model`: callable on float `[B, 3, H, W]` in 0..1 returning raw maps or decoded `[B, N, 5+nc]`.
    Boxes are mapped back to original images with the batch `shapes`; metrics are in original pixels.
    `loss_fn(maps, targets) -> (loss, parts[3])` gives `Metrics.loss` (mean parts) when maps are raw.
    With `save_dir`: `plots` writes PR/F1/P/R curves, the confusion matrix and GT|prediction pairs;
    `save_txt` YOLO label files (`save_conf` adds the score); `save_json` COCO JSON + pycocotools summary
    (`utils.eval.coco`: `coco80` writes COCO's image and category ids; with `anno_json`, an official
    annotation file, pycocotools scores against it and `map50`/`map` become its figures, as YOLOv5 does;
    the printed table keeps ours, and both are printed side by side).
    Prints the results table. Speed is milliseconds per image (pre-process, inference incl. decode, NMS).
    """

    if (plots or save_txt or save_json) and save_dir is None:
        raise ValueError("evaluate: plots/save_txt/save_json need a save_dir")
    if save_json and coco80 and not single_cls and len(names) != 80:
        raise ValueError(f"evaluate: coco80 (COCO category ids) needs the 80 COCO classes, got {len(names)} names")
    device = torch.device(device)
    nc = 1 if single_cls else len(names)
    names = ["item"] if single_cls else list(names)
    was_training = isinstance(model, torch.nn.Module) and model.training
    use_half = half and device.type == "cuda"
    if isinstance(model, torch.nn.Module):
        model.eval()
        if use_half:
            model.half()  # as YOLOv5 does: --half converts the model in place
    cm = ConfusionMatrix(nc)
    labels_dir = Path(save_dir) / "labels" if save_txt else None
    if labels_dir:
        labels_dir.mkdir(parents=True, exist_ok=True)
    preds, gts, shapes0, files = [], [], [], []
    dt, loss_sum, nb = np.zeros(3), torch.zeros(3), 0
    nms_kw = {"conf_thres": conf_thres, "iou_thres": iou_thres, "multi_label": True, "agnostic": single_cls,
              "max_det": max_det}
    try:
        batches = _run_batches(model, tqdm(dataloader, desc=HEADER, leave=False), device, use_half, loss_fn, nms_kw)
        for bi, (imgs, targets, paths, shapes, hw, dets, times, parts) in enumerate(batches):
            dt += times
            if parts is not None:
                loss_sum, nb = loss_sum + parts, nb + 1
            for path, (p, g, s0) in zip(paths, _image_records(dets, targets, shapes, hw, single_cls)):
                preds.append(p), gts.append(g), shapes0.append(s0), files.append(path)
                cm.process_batch(p, g)
                if labels_dir:
                    _save_txt(path, p, s0, labels_dir, save_conf)
            if plots and bi < PLOT_BATCHES:

                plot_val_pairs(imgs, targets, dets, names, Path(save_dir) / f"val_batch{bi}_pairs.jpg")
    finally:
        if was_training:
            model.train()
    m = compute_metrics(preds, gts, nc)
    m.speed = dict(zip(("pre", "inf", "nms"), (dt * 1e3 / max(len(preds), 1)).tolist()))
    m.loss = (loss_sum / nb).numpy() if nb else None
    m.nimg_class = np.array([sum(bool((g[:, 0] == c).any()) for g in gts) for c in range(nc)], dtype=int)
    m.confusion = cm
    print_results(m, names, verbose)
    if plots:
        _finish_plots(m, cm, names, Path(save_dir))
    if save_json:
        _coco_json(m, preds, gts, shapes0, files, names, Path(save_dir), coco80 and not single_cls, anno_json)
    return m


def _coco_json(m: Metrics, preds: list, gts: list, shapes0: list, files: list[str], names: list[str],
               save_dir: Path, coco80: bool, anno_json: str | Path | None) -> None:
    """Write predictions.json + gt_coco.json, print pycocotools' summary and the mAP comparison; fill
    `m.coco_stats` (and `m.map50`, `m.map` when the official `anno_json` scored them)."""
    gt_json, pred_json = save_coco_json(preds, gts, shapes0, names, save_dir, files, coco80)
    ids = image_ids(len(preds), files, coco80)
    ids_note = "image ids from file stems, COCO category ids" if coco80 else "image ids 0.., class indices"
    print(f"COCO JSON ({ids_note}): {pred_json} (detections), {gt_json} (ground truth from the labels)")
    if coco80 and len(set(ids)) < len(ids):
        seen: set = set()
        dup = next(i for i in ids if i in seen or seen.add(i))
        print(f"WARNING: COCO image ids repeat: {len(ids) - len(set(ids))} images have the file stem of an earlier "
              f"one (e.g. {dup!r}), so pycocotools merges them")
    stats, source = None, None
    if anno_json is not None:
        print(f"pycocotools against {anno_json}:")
        stats, source = score_official(pred_json, anno_json, ids), Path(anno_json)
    if stats is None:
        if anno_json is not None:
            print(f"pycocotools against {gt_json.name} (ground truth from the labels) instead:")
        try:
            stats, source = run_cocoeval(gt_json, pred_json, verbose=True), gt_json
        except Exception as e:  # noqa: BLE001 - e.g. mixed int/str image ids; report, keep our figures
            print(f"WARNING: pycocotools failed on {gt_json} ({type(e).__name__}: {first_line(e)})")
            return
    m.coco_stats = stats
    print(("%22s" + "%11s" * 2) % ("", "mAP50", "mAP50-95"))
    print(("%22s" + "%11.3g" * 2) % ("MobileYOLO", m.map50, m.map))
    print(("%22s" + "%11.3g" * 2 + "  (%s)") % ("pycocotools", stats[1], stats[0], source.name))
    if source != gt_json and stats[0] >= 0:
        m.map50, m.map = float(stats[1]), float(stats[0])
