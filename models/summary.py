"""Model size and cost: parameter counts, GFLOPs (2 x MACs) and the per-row table."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module, trainable: bool = False) -> int:
    """Number of parameters (only those with requires_grad when `trainable`)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


@torch.no_grad()
def gflops(model: nn.Module, imgsz: int | tuple[int, int] = 320, ch: int = 3) -> float:
    """GFLOPs of one forward at batch 1, `imgsz` (int or (h, w)), counted by torch's FlopCounterMode.

    FlopCounterMode counts at the ATen-op level (every conv/matmul, whichever module issued it), so
    no module is skipped; it reports 2 x MACs. Elementwise ops (activations, adds) are not counted,
    the usual convention. The model's train/eval mode is restored afterwards.
    """
    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
    p = next(model.parameters())
    x = torch.zeros(1, ch, h, w, dtype=p.dtype, device=p.device)
    training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(training)
    return counter.get_total_flops() / 1e9


def _fmt_from(f: int | list[int]) -> str:
    return str(f)


def summary_table(layers: nn.ModuleList) -> str:
    """One line per row: index, from, n, params, module, args."""
    lines = [f"{'':>3}{'from':>18}{'n':>3}{'params':>10}  {'module':<32}{'arguments'}"]
    for m in layers:
        args = [a.tolist() if isinstance(a, torch.Tensor) else a for a in m.args]
        lines.append(f"{m.i:>3}{_fmt_from(m.f):>18}{m.n:>3}{m.np:>10}  {m.type:<32}{args}")
    return "\n".join(lines)


def summary_line(model: nn.Module, name: str, n_layers: int, imgsz: int | None = 320) -> str:
    """'<name> summary: L layers, P parameters, G gradients, X GFLOPs at imgsz'."""
    text = (f"{name} summary: {n_layers} layers, {count_params(model):,} parameters, "
            f"{count_params(model, trainable=True):,} gradients")
    if imgsz:
        text += f", {gflops(model, imgsz):.3f} GFLOPs at {imgsz}x{imgsz}"
    return text
