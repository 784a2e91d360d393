"""Exponential moving average (EMA) of model weights, used for validation and checkpoints."""
from __future__ import annotations

import copy
import math

import torch
from torch import nn


def de_parallel(model: nn.Module) -> nn.Module:
    """The bare model inside a DataParallel / DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, (nn.parallel.DataParallel, nn.parallel.DistributedDataParallel)) else model


class ModelEMA:
    """Keeps `ema = d * ema + (1 - d) * model` for every floating-point entry of the state_dict.

    The decay ramps up as `d = decay * (1 - exp(-updates / tau))`, so early updates follow the model closely
    (the first weights are random) and later ones average over roughly `1 / (1 - decay)` steps.
    Integer buffers (e.g. BN `num_batches_tracked`) are copied, not averaged. `updates` counts optimizer
    steps and is stored in checkpoints so that a resumed run continues the same ramp.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0, updates: int = 0) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ModelEMA: decay must be in [0, 1), got {decay}")
        if tau <= 0:
            raise ValueError(f"ModelEMA: tau must be > 0, got {tau}")
        self.ema = copy.deepcopy(de_parallel(model)).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.decay, self.tau, self.updates = float(decay), float(tau), int(updates)

    def current_decay(self) -> float:
        """The decay the next `update()` uses after incrementing `updates`."""
        return self.decay * (1.0 - math.exp(-self.updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the EMA one step towards `model` (call after each optimizer step)."""
        self.updates += 1
        d = self.current_decay()
        src = de_parallel(model).state_dict()
        seen: set[int] = set()
        for name, v in self.ema.state_dict().items():
            if v.data_ptr() in seen:  # a module registered under two names (aliases) must move once
                continue
            seen.add(v.data_ptr())
            if name not in src:
                raise KeyError(f"ModelEMA.update: model has no entry {name!r}; EMA and model differ")
            if v.dtype.is_floating_point:
                v.mul_(d).add_(src[name].detach().to(v.dtype), alpha=1.0 - d)
            else:
                v.copy_(src[name])

    def update_attr(self, model: nn.Module, include: tuple[str, ...] = ("yaml", "names", "stride", "nc")) -> None:
        """Copy plain attributes (names, stride...) from `model` that are not part of the state_dict."""
        m = de_parallel(model)
        for k in include:
            if hasattr(m, k):
                setattr(self.ema, k, copy.deepcopy(getattr(m, k)))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA weights (for `ckpt['ema']`)."""
        return self.ema.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int | None = None) -> None:
        """Restore EMA weights (strict) and optionally the update counter from a checkpoint."""
        self.ema.load_state_dict(state, strict=True)
        if updates is not None:
            self.updates = int(updates)
