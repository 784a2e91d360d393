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
        self._cache: tuple | None = None  # (model, identity checks, tensor lists), see _pairs

    def current_decay(self) -> float:
        """The decay the next `update()` uses after incrementing `updates`."""
        return self.decay * (1.0 - math.exp(-self.updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the EMA one step towards `model` (call after each optimizer step)."""
        self.updates += 1
        d = self.current_decay()
        floats_ema, floats_src, ints_ema, ints_src = self._pairs(de_parallel(model))
        if floats_ema:  # one foreach op per kind: a Python loop over ~300 tensors costs more than the step it follows
            torch._foreach_lerp_(floats_ema, floats_src, 1.0 - d)  # ema + (1 - d) * (src - ema)
        if ints_ema:
            torch._foreach_copy_(ints_ema, ints_src)

    def _pairs(self, src: nn.Module) -> tuple[list, list, list, list]:
        """(float EMA tensors, their model tensors, integer EMA tensors, theirs), matched by state_dict name.

        Cached while `src` is the same module holding the same tensor objects (the optimizer and BatchNorm
        update them in place); anything reassigned (a `.to()`, a swapped buffer) rebuilds the lists.
        Raises KeyError when the EMA has an entry the model lacks.
        """
        cache = self._cache
        if cache is not None and cache[0] is src and all(owner.get(k) is t and t.data_ptr() == ptr
                                                         for owner, k, t, ptr in cache[1]):
            return cache[2]
        src_sd = src.state_dict(keep_vars=True)
        floats_ema, floats_src, ints_ema, ints_src = [], [], [], []
        seen: set[int] = set()
        for name, v in self.ema.state_dict().items():
            if v.data_ptr() in seen:  # a module registered under two names (aliases) must move once
                continue
            seen.add(v.data_ptr())
            if name not in src_sd:
                raise KeyError(f"ModelEMA.update: model has no entry {name!r}; EMA and model differ")
            t = src_sd[name].detach()
            if v.dtype.is_floating_point:
                floats_ema.append(v)
                floats_src.append(t if t.dtype == v.dtype else t.to(v.dtype))
            else:
                ints_ema.append(v)
                ints_src.append(t)
        checks = [(owner, k, t, t.data_ptr()) for m in src.modules() for owner in (m._parameters, m._buffers)
                  for k, t in owner.items() if t is not None]
        pairs = (floats_ema, floats_src, ints_ema, ints_src)
        # a converted copy (dtype differs) is a snapshot, not the live tensor: never cache those lists
        if all(a.dtype == b.dtype for a, b in zip(floats_ema, floats_src)):
            self._cache = (src, checks, pairs)
        return pairs

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
        self._cache = None
        if updates is not None:
            self.updates = int(updates)
