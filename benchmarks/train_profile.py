"""Where a training step's time goes, row by row of a model YAML: forward + backward ms per row.

    python benchmarks/train_profile.py --cfg models/mobilenetv3-small-yolo.yaml
    python benchmarks/train_profile.py --cfg models/yolov5n.yaml --batch 16 --imgsz 320 --threads 2

Each row runs alone on the inputs the full model feeds it (computed once, detached), and its outputs
are back-propagated with a dense gradient of ones, so rows can be compared but do not share caches
as in the full step. Also prints the whole forward + backward, the loss alone (on detached maps) and
the sum of the rows, in train mode and channels_last as train.py trains, with the CPU training kernels
swapped in as train.py does (`utils.accel.swap.accelerate`; `--no-accel` for plain PyTorch). Random
data, no data loading.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # script run: import from the repo root


def _median_ms(fn, steps: int, warmup: int = 2) -> float:
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        fn()
        if i >= warmup:
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _inputs_per_row(model, x: torch.Tensor) -> list:
    """What each row of `model.layers` receives in a forward pass on `x` (detached)."""
    from models.yolo import row_input

    ins, y = [], {}
    with torch.no_grad():
        for m in model.layers:
            ins.append(row_input(m, x, y))
            x = y[m.i] = m(ins[-1])
    return ins


def _row_step(m, inp):
    """A callable: forward of row `m` on fresh leaves of `inp`, then backward with ones."""
    def leaf(a):
        return [leaf(b) for b in a] if isinstance(a, list) else a.detach().requires_grad_(m.i > 0)

    def step() -> None:
        out = m(leaf(inp))
        outs = out if isinstance(out, list) else [out]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    return step


def run(cfg: str | Path, imgsz: int = 320, batch: int = 16, steps: int = 5, threads: int = 0, nc: int = 3,
        accel: bool = True) -> dict:
    """Print and return `{'full': ms, 'loss': ms, 'rows': [(index, module, ms)], 'accel': modules on the
    CPU training kernels}` for `cfg`; `accel=False`: plain PyTorch."""
    from models.yolo import Model
    from utils.accel.swap import accelerate
    from utils.data import load_hyp
    from utils.train.loss import ComputeLoss

    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = Model(cfg, nc=nc).train().to(memory_format=torch.channels_last)
    n_accel = accelerate(model, enabled=accel, log=print)
    loss_fn = ComputeLoss(model.detect.anchors, model.detect.stride, nc, load_hyp(), imgsz=imgsz)
    x = torch.rand(batch, 3, imgsz, imgsz).contiguous(memory_format=torch.channels_last)
    targets = torch.tensor([[i // 4, i % nc, 0.3 + 0.1 * (i % 4), 0.5, 0.2, 0.3] for i in range(4 * batch)])
    full = _median_ms(lambda: loss_fn(model(x), targets)[0].backward(), steps)
    maps = [m.detach().requires_grad_() for m in model(x)]
    loss = _median_ms(lambda: loss_fn(maps, targets)[0].backward(), steps)
    rows = [(m.i, m.type, _median_ms(_row_step(m, inp), steps)) for m, inp in zip(model.layers, _inputs_per_row(model, x))]
    total = sum(r[2] for r in rows)
    print(f"{Path(cfg).name}: {imgsz} px, batch {batch}, {torch.get_num_threads()} threads, median of {steps} steps")
    print(f"{'row':>4}  {'module':<32}{'fwd+bwd ms':>11}{'share':>8}")
    for i, t, ms in rows:
        print(f"{i:>4}  {t:<32}{ms:>11.1f}{ms / total:>8.1%}")
    print(f"sum of rows {total:.1f} ms; full forward + backward {full:.1f} ms; loss alone {loss:.1f} ms")
    return {"full": full, "loss": loss, "rows": rows, "accel": n_accel}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", default="models/mobilenetv3-small-yolo.yaml")
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--no-accel", dest="accel", action="store_false", help="plain PyTorch: no CPU training kernels")
    a = p.parse_args(argv)
    if a.batch < 1 or a.steps < 1 or a.imgsz < 32 or a.imgsz % 32:
        p.error("--batch and --steps must be >= 1, --imgsz a multiple of 32")
    run(a.cfg, a.imgsz, a.batch, a.steps, a.threads, accel=a.accel)


if __name__ == "__main__":
    main()
