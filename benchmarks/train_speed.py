"""Training throughput on the CPU: images/s of forward + loss + backward + optimizer step, and peak memory.

    python benchmarks/train_speed.py                      # every detector YAML in models/, 320 px, batch 16
    python benchmarks/train_speed.py --cfg models/mobilenetv3-small-yolo.yaml --steps 10 --threads 2
    python benchmarks/train_speed.py --paired models/mobilenetv3-small-yolo.yaml models/yolov5n.yaml --steps 20
    python benchmarks/train_speed.py --no-accel ...       # plain PyTorch: without our CPU training kernels

Each model runs in its own subprocess so that its peak resident memory (RSS, ru_maxrss; psutil when
installed) is its own. Inputs are random images with random boxes: data loading is not measured.
Classifier YAMLs (no Detect row) are skipped. Prints a markdown table. Models are set up as train.py
sets them up, CPU training kernels included (`utils.accel.swap.accelerate`, one line on stderr says how
many modules use them); `--no-accel` sets `MOBILEYOLO_CPU_KERNELS=0`, which the subprocesses inherit.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def is_detector_yaml(path: Path) -> bool:
    """True when the model YAML's last head row is a Detect head (classifiers end in Classify)."""
    import yaml

    d = yaml.safe_load(path.read_text())
    rows = (d.get("head") or []) if isinstance(d, dict) else []
    return bool(rows) and str(rows[-1][2]) == "Detect"


def _peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB.

    ru_maxrss is the kernel's own high-water mark (KiB on Linux, bytes on macOS); psutil only reports
    the current RSS off Windows, so it is the fallback where `resource` does not exist.
    """
    try:
        import resource
    except ImportError:
        import psutil

        info = psutil.Process().memory_info()
        return getattr(info, "peak_wset", info.rss) / 2**20
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 2**20 if sys.platform == "darwin" else kib / 1024


def training_step(cfg: str, imgsz: int = 320, batch: int = 16, nc: int = 3, freeze: int = 0):  # noqa: ANN201
    """(model, step): `step()` runs one forward + loss + backward + SGD step of `cfg` on fixed random data.

    As train.py trains: train mode, channels_last, `accelerate()`d (unless `MOBILEYOLO_CPU_KERNELS=0`).
    `freeze`: as --freeze, the first rows get no gradients.
    """
    import torch

    sys.path.insert(0, str(ROOT))
    from models.yolo import Model
    from utils.accel.swap import accelerate
    from utils.data import load_hyp
    from utils.train.loss import ComputeLoss
    from utils.train.optim import build_optimizer, freeze_layers

    torch.manual_seed(0)
    model = Model(cfg, nc=nc).train().to(memory_format=torch.channels_last)
    freeze_layers(model, freeze)
    accelerate(model, log=lambda line: print(f"{Path(cfg).name}: {line}", file=sys.stderr))
    hyp = load_hyp()
    loss_fn = ComputeLoss(model.detect.anchors, model.detect.stride, nc, hyp, imgsz=imgsz)
    opt = build_optimizer(model, "SGD", hyp["lr0"], hyp["momentum"], hyp["weight_decay"])
    imgs = torch.rand(batch, 3, imgsz, imgsz).contiguous(memory_format=torch.channels_last)
    n = 4 * batch  # four boxes per image
    g = torch.Generator().manual_seed(0)
    wh = torch.rand(n, 2, generator=g) * 0.3 + 0.05
    xy = torch.rand(n, 2, generator=g) * (1 - wh) + wh / 2
    targets = torch.cat([torch.arange(batch).repeat_interleave(4)[:, None].float(),
                         torch.randint(0, nc, (n, 1), generator=g).float(), xy, wh], 1)

    def step() -> None:
        loss, _ = loss_fn(model(imgs), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return model, step


def measure(cfg: str, imgsz: int = 320, batch: int = 16, steps: int = 5, warmup: int = 2, threads: int = 0,
            nc: int = 3, freeze: int = 0) -> dict:
    """Train `steps` timed steps (after `warmup`) of `cfg` on random data; return figures as a dict.

    Keys: `cfg`, `params` (M), `img_s` (training images per second), `step_ms`, `peak_rss_mb`, `accel`
    (how many modules run on the CPU training kernels).
    """
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    model, step = training_step(cfg, imgsz, batch, nc, freeze)
    from utils.accel.swap import is_accelerated  # after training_step, which puts the repo on sys.path
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]  # median: robust to a noisy, shared machine
    return {"cfg": Path(cfg).name, "params": sum(p.numel() for p in model.parameters()) / 1e6,
            "img_s": batch / step_s, "step_ms": step_s * 1e3, "peak_rss_mb": _peak_rss_mb(), "batch": batch,
            "steps_ms": [t * 1e3 for t in times], "accel": sum(is_accelerated(m) for m in model.modules())}


def paired(cfg_a: str, cfg_b: str, imgsz: int = 320, batch: int = 16, steps: int = 10, warmup: int = 2,
           threads: int = 0) -> dict:
    """Both models in one process, one step of each in turn: the ratio of their training speeds.

    A slow spell of a shared machine lasts seconds, longer than a step, so it hits both steps of a pair;
    the median of the per-pair ratios is then far steadier than a ratio of two separate runs.
    Keys: `ratio` (a's images/s over b's, median over pairs), `iqr` (its quartiles), `pairs`,
    `img_s` ({cfg name: median images/s}).
    """
    import statistics

    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    fns = [training_step(c, imgsz, batch)[1] for c in (cfg_a, cfg_b)]
    times: list[list[float]] = [[], []]
    for i in range(warmup + steps):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times[k].append(time.perf_counter() - t0)
    ratios = sorted(b / a for a, b in zip(*times))
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {"ratio": statistics.median(ratios), "iqr": (q[0], q[2]), "pairs": len(ratios),
            "img_s": {Path(c).name: batch / statistics.median(t) for c, t in zip((cfg_a, cfg_b), times)}}


def run(cfgs: list[str] | None = None, imgsz: int = 320, batch: int = 16, steps: int = 5, warmup: int = 2,
        threads: int = 0, rounds: int = 1, freeze: int = 0) -> list[dict]:
    """Measure each YAML in a fresh subprocess and print the markdown table; return the rows.

    With `rounds` > 1 every model is measured once per round, models in turn, and a row pools the
    step times of all its rounds (median) and keeps the highest peak RSS: a slow spell of the machine
    then hits every model instead of the one that happened to be running.
    """
    if not cfgs:
        cfgs = [str(p) for p in sorted((ROOT / "models").glob("*.yaml")) if is_detector_yaml(p)]
    pooled: dict[str, dict] = {}
    for r in range(max(1, rounds)):
        for cfg in cfgs:
            cmd = [sys.executable, __file__, "--one", cfg, "--imgsz", str(imgsz), "--batch", str(batch),
                   "--steps", str(steps), "--warmup", str(warmup), "--threads", str(threads), "--freeze", str(freeze)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                print(f"{cfg}: failed\n{res.stderr[-2000:]}", file=sys.stderr)
                continue
            row = json.loads(res.stdout.strip().splitlines()[-1])
            if cfg in pooled:
                row["steps_ms"] = pooled[cfg]["steps_ms"] + row["steps_ms"]
                row["peak_rss_mb"] = max(row["peak_rss_mb"], pooled[cfg]["peak_rss_mb"])
            pooled[cfg] = row
            print(f"done {Path(cfg).name} (round {r + 1}/{max(1, rounds)})", file=sys.stderr)
    rows = []
    for row in pooled.values():
        step = sorted(row["steps_ms"])[len(row["steps_ms"]) // 2]
        rows.append({**row, "step_ms": step, "img_s": batch / step * 1e3})
    import torch

    print(f"\nTraining speed, CPU, nc=3, {imgsz} px, batch {batch}, threads {threads or torch.get_num_threads()}, "
          f"median of {steps} steps (forward + loss + backward + SGD step; no data loading"
          f"{f'; rows 0-{freeze - 1} frozen' if freeze else ''}):\n")
    print("| model | params (M) | train img/s | step (ms) | peak RSS (MiB) | modules on CPU kernels |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['cfg']} | {r['params']:.2f} | {r['img_s']:.1f} | {r['step_ms']:.0f} | {r['peak_rss_mb']:.0f} "
              f"| {r.get('accel', 0)} |")
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", nargs="*", default=None, help="model YAMLs (default: every detector in models/)")
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--rounds", type=int, default=1, help="measure every model this many times, in turn")
    p.add_argument("--freeze", type=int, default=0, help="freeze the first N rows, as train.py --freeze")
    p.add_argument("--paired", nargs=2, default=None, metavar=("A", "B"),
                   help="print A's training speed over B's, from steps of the two taken in turn in one process")
    p.add_argument("--no-accel", action="store_true",
                   help="plain PyTorch: no CPU training kernels (sets MOBILEYOLO_CPU_KERNELS=0 for this run)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one YAML, print JSON
    a = p.parse_args(argv)
    if a.no_accel:  # the environment switch, so that the per-model subprocesses inherit it
        os.environ["MOBILEYOLO_CPU_KERNELS"] = "0"
    if a.paired:
        res = paired(*a.paired, a.imgsz, a.batch, a.steps, a.warmup, a.threads)
        print(json.dumps(res))
        (na, ia), (nb, ib) = res["img_s"].items()
        print(f"{na} {ia:.1f} img/s, {nb} {ib:.1f} img/s; ratio {res['ratio']:.2f}x "
              f"(IQR {res['iqr'][0]:.2f}-{res['iqr'][1]:.2f} over {res['pairs']} pairs)", file=sys.stderr)
        return
    if a.one:
        print(json.dumps(measure(a.one, a.imgsz, a.batch, a.steps, a.warmup, a.threads, freeze=a.freeze)))
        return
    run(a.cfg, a.imgsz, a.batch, a.steps, a.warmup, a.threads, a.rounds, a.freeze)


if __name__ == "__main__":
    main()
