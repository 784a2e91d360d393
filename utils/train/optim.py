"""Optimizer with three parameter groups, LR schedules and the warm-up ramp.

Groups (each carries a `name` key, kept in optimizer state_dicts):
  `weights` - conv/linear weights, with weight decay;
  `norm`    - normalisation-layer weights (BatchNorm, GroupNorm, LayerNorm...), no weight decay;
  `bias`    - all biases, no weight decay; their LR starts the warm-up at `warmup_bias_lr`.
Decaying BN scales or biases only shrinks them towards zero without regularising anything useful.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

OPTIMIZERS = ("SGD", "Adam", "AdamW")
BN_MOMENTUM = 0.03  # YOLOv5's value; hyp `bn_momentum` overrides it
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def split_param_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters split into `weights`, `norm` and `bias` lists (frozen ones are left out)."""
    groups: dict[str, list[nn.Parameter]] = {"weights": [], "norm": [], "bias": []}
    seen: set[int] = set()
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if pname == "bias":
                groups["bias"].append(p)
            elif isinstance(module, _NORM_TYPES):
                groups["norm"].append(p)
            else:
                groups["weights"].append(p)
    return groups


def _fused_ok(params: list[nn.Parameter]) -> bool | None:
    """True when torch's fused (one-kernel) optimizer step applies to all `params`, else None (torch's default).

    The default on the CPU is a Python loop over tensors, several times slower for our ~200-tensor models
    (docs/PERFORMANCE.md); results agree to float rounding.
    """
    return True if params and all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64)
                                  for p in params) else None


def build_optimizer(model: nn.Module, name: str = "SGD", lr: float = 0.01, momentum: float = 0.937,
                    weight_decay: float = 5e-4) -> torch.optim.Optimizer:
    """SGD (Nesterov) / Adam / AdamW over the three groups; `momentum` is Adam's beta1.

    Group order is fixed (`norm`, `weights`, `bias`) so a resumed optimizer state_dict lines up. The step
    is torch's fused one where every parameter allows it (`_fused_ok`).
    Raises ValueError for an unknown name or a model without trainable parameters.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"--optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")
    g = split_param_groups(model)
    if not any(g.values()):
        raise ValueError("build_optimizer: the model has no trainable parameters (everything frozen?)")
    fused = _fused_ok([p for ps in g.values() for p in ps])
    if name == "SGD":
        opt: torch.optim.Optimizer = torch.optim.SGD([{"params": g["norm"]}], lr=lr, momentum=momentum,
                                                     nesterov=True, fused=fused)
    elif name == "Adam":
        opt = torch.optim.Adam([{"params": g["norm"]}], lr=lr, betas=(momentum, 0.999), fused=fused)
    else:
        opt = torch.optim.AdamW([{"params": g["norm"]}], lr=lr, betas=(momentum, 0.999), weight_decay=0.0, fused=fused)
    opt.param_groups[0]["name"] = "norm"
    opt.param_groups[0]["weight_decay"] = 0.0
    opt.add_param_group({"params": g["weights"], "weight_decay": weight_decay, "name": "weights"})
    opt.add_param_group({"params": g["bias"], "weight_decay": 0.0, "name": "bias"})
    # torch keeps an empty group fine; the fixed order is what matters for resume.
    return opt


def lr_lambda(epochs: int, lrf: float, cos: bool = False) -> Callable[[int], float]:
    """LR multiplier per epoch: 1 at epoch 0 falling to `lrf` at `epochs`, linearly or on a half cosine."""
    if epochs < 1:
        raise ValueError(f"lr_lambda: epochs must be >= 1, got {epochs}")
    if cos:
        return lambda e: ((1 - math.cos(min(e, epochs) * math.pi / epochs)) / 2) * (lrf - 1) + 1
    return lambda e: (1 - min(e, epochs) / epochs) * (1.0 - lrf) + lrf


def build_scheduler(optimizer: torch.optim.Optimizer, epochs: int, lrf: float, cos: bool = False,
                    start_epoch: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per epoch; `start_epoch > 0` places it where a resumed run left off."""
    for g in optimizer.param_groups:
        g.setdefault("initial_lr", g["lr"])
    # With last_epoch = start_epoch - 1 the constructor's initial step lands on start_epoch and sets its LR.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(epochs, lrf, cos), last_epoch=start_epoch - 1)


def warmup_iters(warmup_epochs: float, batches_per_epoch: int, minimum: int = 100) -> int:
    """Number of warm-up iterations: `warmup_epochs` epochs but at least `minimum`; 0 when warm-up is off."""
    if warmup_epochs <= 0:
        return 0
    return max(round(warmup_epochs * batches_per_epoch), minimum)


def apply_warmup(optimizer: torch.optim.Optimizer, ni: int, nw: int, epoch_lr_factor: float, hyp: dict,
                 momentum_key: str = "momentum") -> None:
    """Set LR and momentum for iteration `ni` of a `nw`-iteration warm-up (no-op when `ni > nw`).

    At `ni == nw` the targets themselves are set, so the rest of the epoch trains at the scheduled LR
    rather than the last ramp value. LR ramps linearly from 0 (biases: from `hyp['warmup_bias_lr']`)
    to `initial_lr * epoch_lr_factor`; SGD momentum (or Adam beta1) from `hyp['warmup_momentum']` to
    `hyp['momentum']`.
    """
    if nw <= 0 or ni > nw:
        return
    xi = [0, nw]
    for g in optimizer.param_groups:
        start = hyp.get("warmup_bias_lr", 0.1) if g.get("name") == "bias" else 0.0
        g["lr"] = float(np.interp(ni, xi, [start, g["initial_lr"] * epoch_lr_factor]))
        mom = float(np.interp(ni, xi, [hyp.get("warmup_momentum", 0.8), hyp[momentum_key]]))
        if "momentum" in g:
            g["momentum"] = mom
        elif "betas" in g:
            g["betas"] = (mom, g["betas"][1])


def accumulate_steps(batch_size: int, nbs: int = 64) -> int:
    """Batches to accumulate before an optimizer step so the effective batch is about `nbs`."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    return max(round(nbs / batch_size), 1)


def scaled_weight_decay(weight_decay: float, batch_size: int, accumulate: int, nbs: int = 64) -> float:
    """Weight decay scaled to the effective batch (`batch_size * accumulate`) relative to `nbs`."""
    return weight_decay * batch_size * accumulate / nbs


def freeze_layers(model: nn.Module, n: int) -> list[str]:
    """Freeze the parameters of the first `n` YAML rows (`layers.0.` .. `layers.{n-1}.`); return their names.

    Matching on the `layers.<i>.` prefix keeps it independent of how each block names its children.
    """
    if n < 0:
        raise ValueError(f"--freeze must be >= 0, got {n}")
    prefixes = tuple(f"layers.{i}." for i in range(n))
    frozen = []
    for name, p in model.named_parameters():
        if name.startswith(prefixes):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def set_bn_momentum(model: nn.Module, momentum: float) -> int:
    """Set the running-statistics momentum of every BatchNorm layer; return how many were set.

    Validation runs in eval mode on the running statistics. torchvision's MobileNetV3 uses 0.01, which
    suits long ImageNet schedules but lags far behind fast-changing weights in a short run, and validation then sees stale statistics
    (docs/PERFORMANCE.md has the BCCD measurement).
    """
    if not 0.0 < momentum <= 1.0:
        raise ValueError(f"hyp bn_momentum must be in (0, 1], got {momentum}")
    n = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = float(momentum)
            n += 1
    return n
