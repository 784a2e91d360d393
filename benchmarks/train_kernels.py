"""The CPU training kernels (the mobileyolo:: ops of utils/accel) against PyTorch's kernels: per op, and per step.

    python benchmarks/train_kernels.py                       # MobileNetV3-Small-YOLO's shapes, 320 px, batch 16
    python benchmarks/train_kernels.py --cfg models/yolov5n.yaml --steps 8 --threads 2

Per op: the median ms of (a) a depthwise conv's weight gradient, aten's (oneDNN) against ours, on every
depthwise shape of the model's training step (all kernel sizes, though training uses ours from
`DW_MIN_K` up); (b) BatchNorm + activation forward + backward and (c)
squeeze-excite forward + backward, PyTorch's modules against the ops, on the model's largest
shapes; "ours" is the op as training calls it (input checks and dispatch included). Then whole
training steps of the model accelerated (`utils.accel.swap.accelerate`, as train.py) and plain
(`decelerate`), taken in turn in one process (ratio = median over pairs). Random data; run with
benchmarks/run.py's malloc settings in the environment to match train.py
(`utils.infer.runtime.MALLOC_SETTINGS`).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # script run: import from the repo root

CL = torch.channels_last


def _ms(fn, runs: int = 15, warmup: int = 3) -> float:  # noqa: ANN001
    from benchmarks.train_profile import _median_ms

    return _median_ms(fn, runs, warmup)


def shapes_of(model: nn.Module, imgsz: int, batch: int) -> dict[str, list]:
    """Input shapes the model's depthwise convs, BatchNorms (with activation) and SE layers see."""
    from models.common import ConvBNAct
    from models.mobilenetv3 import SELayer
    from utils.accel.train_kernels import plain_depthwise

    found: dict[str, list] = {"dw": [], "bn": [], "se": []}
    hooks = []
    for m in model.modules():
        if isinstance(m, ConvBNAct) and plain_depthwise(m.conv):
            hooks.append(m.conv.register_forward_hook(lambda mod, i, o: found["dw"].append(
                (tuple(i[0].shape), mod.kernel_size[0], mod.stride[0], mod.padding[0]))))
        if isinstance(m, ConvBNAct):
            hooks.append(m.bn.register_forward_hook(lambda mod, i, o, a=m.act: found["bn"].append(
                (tuple(i[0].shape), type(a)))))
        if isinstance(m, SELayer):
            hooks.append(m.register_forward_hook(lambda mod, i, o: found["se"].append(tuple(i[0].shape))))
    with torch.no_grad():
        model.eval()(torch.rand(batch, 3, imgsz, imgsz).contiguous(memory_format=CL))
    for h in hooks:
        h.remove()
    return {k: list(dict.fromkeys(v)) for k, v in found.items()}  # unique, in order


def op_rows(shapes: dict[str, list], top: int = 4) -> list[tuple[str, str, float, float]]:
    """(op, shape, PyTorch ms, ours ms) rows; the ops must be registered (`utils.accel.ops.register`)."""
    from models.mobilenetv3 import SELayer
    from utils.accel.ops import grad_op
    from utils.accel.train_kernels import ACT_CODES

    rows = []
    mo = torch.ops.mobileyolo
    for shape, k, s, p in shapes["dw"]:
        x = torch.randn(shape).contiguous(memory_format=CL)
        w = torch.randn(shape[1], 1, k, k)
        g = torch.nn.functional.conv2d(x, w, None, s, p, 1, shape[1]).contiguous(memory_format=CL)

        def aten():
            torch.ops.aten.convolution_backward(g, x, w, None, [s, s], [p, p], [1, 1], False, [0, 0], shape[1],
                                                [False, True, False])

        def ours():
            mo.dw_weight_grad(x, g, k, s, p)

        rows.append((f"depthwise {k}x{k}/{s} weight grad", str(list(shape)), _ms(aten), _ms(ours)))
    fused = [(sh, a) for sh, a in shapes["bn"] if a in ACT_CODES]
    for shape, act in sorted(fused, key=lambda r: -torch.Size(r[0]).numel())[:top]:
        bn, a = nn.BatchNorm2d(shape[1]).train(), act()
        x = torch.randn(shape).contiguous(memory_format=CL).requires_grad_()
        gy = torch.randn(shape).contiguous(memory_format=CL)
        rows.append((f"BatchNorm + {act.__name__} fwd+bwd", str(list(shape)),
                     _ms(lambda: a(bn(x)).backward(gy)),
                     _ms(lambda: grad_op("bn_act_forward")(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, 0.1,
                                                           1e-3, ACT_CODES[act]).backward(gy))))
    for shape in sorted(shapes["se"], key=lambda sh: -torch.Size(sh).numel())[:top]:
        se = SELayer(shape[1]).train()
        x = torch.randn(shape).contiguous(memory_format=CL).requires_grad_()
        gy = torch.randn(shape).contiguous(memory_format=CL)
        args = (se.fc1.weight, se.fc1.bias, se.fc2.weight, se.fc2.bias)
        rows.append(("squeeze-excite fwd+bwd", str(list(shape)), _ms(lambda: _torch_se(se, x, gy)),
                     _ms(lambda: grad_op("se_forward")(x, *args).backward(gy))))
    return rows


def _torch_se(se: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> None:
    """SELayer's plain PyTorch forward and backward."""
    import torch.nn.functional as F

    h = F.relu(F.linear(x.mean((2, 3)), se.fc1.weight.flatten(1), se.fc1.bias))
    (x * F.hardsigmoid(F.linear(h, se.fc2.weight.flatten(1), se.fc2.bias))[:, :, None, None]).backward(gy)


def step_ab(cfg: str, imgsz: int, batch: int, steps: int) -> tuple[float, float, float]:
    """(accelerated step ms, plain step ms, median per-pair ratio accelerated/plain), steps taken in turn
    on one model, `accelerate()`d before each first step of a pair and `decelerate()`d before the second."""
    from benchmarks.train_speed import training_step
    from utils.accel.swap import accelerate, decelerate

    model, step = training_step(cfg, imgsz, batch)  # accelerated, as train.py's model
    for _ in range(2):
        step()
    a, b = [], []
    for _ in range(steps):
        for on, acc in ((True, a), (False, b)):
            accelerate(model, log=lambda line: None) if on else decelerate(model)
            t = time.perf_counter()
            step()
            acc.append((time.perf_counter() - t) * 1e3)
    return statistics.median(a), statistics.median(b), statistics.median(x / y for x, y in zip(a, b))


def run(cfg: str = "models/mobilenetv3-small-yolo.yaml", imgsz: int = 320, batch: int = 16, steps: int = 6,
        threads: int = 0, ops: bool = True) -> dict:
    """Print both tables; return {"ops": rows, "step": (fast ms, torch ms, ratio)}."""
    from models.yolo import Model
    from utils.accel import native
    from utils.accel import ops as accel_ops

    if threads > 0:
        torch.set_num_threads(threads)
    if native.load() is None:
        raise SystemExit(f"the kernels library is unavailable: {native.unavailable_reason()}")
    accel_ops.register()
    out: dict = {"ops": []}
    if ops:
        out["ops"] = op_rows(shapes_of(Model(cfg, nc=3), imgsz, batch))
        print(f"\n{Path(cfg).name}, {imgsz} px, batch {batch}, {torch.get_num_threads()} threads, median ms:\n")
        print("| op | input | PyTorch | ours | ours / PyTorch |\n|---|---|---:|---:|---:|")
        for op, shape, t, o in out["ops"]:
            print(f"| {op} | {shape} | {t:.2f} | {o:.2f} | {o / t:.2f} |")
    fast, ref, r = out["step"] = step_ab(cfg, imgsz, batch, steps)
    print(f"\ntraining step (forward + loss + backward + SGD), {steps} pairs in turn: accelerated {fast:.0f} ms "
          f"({batch / fast * 1e3:.1f} img/s), PyTorch's kernels {ref:.0f} ms ({batch / ref * 1e3:.1f} img/s), "
          f"step time ratio {r:.2f}")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", default="models/mobilenetv3-small-yolo.yaml")
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=6, help="training step pairs (accelerated, plain) in turn")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--no-ops", action="store_true", help="only the training step A/B")
    a = p.parse_args(argv)
    run(a.cfg, a.imgsz, a.batch, a.steps, a.threads, not a.no_ops)


if __name__ == "__main__":
    main()
