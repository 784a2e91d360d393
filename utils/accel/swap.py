"""`accelerate(model)`: the one step that puts the CPU training kernels into a model, and its inverse.

Models are plain PyTorch and never import utils.accel. A script that trains calls `accelerate(model)`
once after building the model (train.py's `setup()`, the training benchmarks); nothing else does.

How: each eligible module's `__class__` becomes a generated subclass of its own class (a `Conv` becomes
an `AcceleratedConv`, a `SELayer` an `AcceleratedSELayer`) that overrides `forward` only. Its forward
takes the `mobileyolo::` custom ops where `utils.accel.train_kernels` says they apply (train mode,
autograd on, CPU float32 channels_last input, ...) and otherwise runs exactly the class's own forward,
so eval mode, `no_grad`, other dtypes or devices are plain PyTorch. The instance is kept, so are its
parameters, buffers, hooks, state_dict keys, YAML-row attributes (`.i`, `.f`, `.type`, `.np`) and
`isinstance` against every class it was: a checkpoint of an accelerated model loads into a plain one.
Chosen over swapping `forward` per instance because the class says what the module is (its repr
reads `AcceleratedConv(...)`) and `decelerate()` is one assignment back.

Copies are plain: `copy.deepcopy` and pickling give the original class (the generated classes are not
importable, and acceleration belongs to this process's instance, not to the model's data). So
ModelEMA's copy, checkpoints and exports hold plain modules. TorchScript cannot script the generated
forward: `decelerate()` a model before `torch.jit.script` (export starts from checkpoints: plain).

Off switches: `accelerate(model, enabled=False)` (train.py `--no-accel`), or `MOBILEYOLO_CPU_KERNELS=0`
in the environment (wins over enabled=True; the library is then never built or loaded).

Eligible: `ConvBNAct` (and subclasses: Conv, DWConv, conv_bn_hswish, ...) whose BatchNorm the kernel
takes and that has a fused activation (ReLU, Hardswish, none) or a depthwise conv of kernel
`DW_MIN_K`+; `SELayer` with biased fc1 / fc2. Parameters on the CPU only.
"""
from __future__ import annotations

import copyreg
import logging
import os
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from models.common import ConvBNAct
from models.mobilenetv3 import SELayer
from utils.accel import native, ops, train_kernels

LOGGER = logging.getLogger("mobileyolo.accel")
_CLASSES: dict[type, type] = {}  # plain class -> its generated accelerated subclass
_LOCK = threading.Lock()


class Accelerated:
    """Base of the generated classes; `plain_class` is the class the module had before."""

    plain_class: type[nn.Module]

    def __reduce_ex__(self, protocol: Any) -> Any:  # copies and pickles are of the plain class
        rv = super().__reduce_ex__(protocol)
        # object's reduction names type(self) in its constructor arguments; pickle requires that class
        # for copyreg.__newobj__, so the plain class is rebuilt through copyreg._reconstructor instead
        # (object.__new__(plain) and then the same state), which both pickle and copy accept
        if isinstance(rv, tuple) and rv[0] in (copyreg.__newobj__, copyreg._reconstructor):
            rv = (copyreg._reconstructor, (self.plain_class, object, None), *rv[2:])
        return rv


class _ConvBNActForward(Accelerated):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = train_kernels.conv_bn_act(self, x)
        return super().forward(x) if y is None else y


class _SEForward(Accelerated):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = train_kernels.squeeze_excite(self, x)
        return super().forward(x) if y is None else y


def _on_cpu(m: nn.Module) -> bool:
    return all(p.device.type == "cpu" for p in m.parameters())


def _eligible(m: nn.Module) -> type | None:
    """The forward mixin for module `m`, or None when it stays as it is."""
    if isinstance(m, Accelerated) or not _on_cpu(m):
        return None
    if isinstance(m, ConvBNAct) and train_kernels.convbnact_gains(m):
        return _ConvBNActForward
    if isinstance(m, SELayer) and m.fc1.bias is not None and m.fc2.bias is not None:
        return _SEForward
    return None


def accelerated_class(cls: type, mixin: type) -> type:
    """The generated subclass of `cls` with `mixin`'s forward (one per class, made on first use)."""
    with _LOCK:
        if cls not in _CLASSES:
            name = f"Accelerated{cls.__name__}"
            _CLASSES[cls] = type(name, (mixin, cls), {"plain_class": cls, "__module__": __name__,
                                                      "__qualname__": name, "__doc__": cls.__doc__})
        return _CLASSES[cls]


def is_accelerated(m: nn.Module) -> bool:
    """Whether `accelerate()` swapped module `m`."""
    return isinstance(m, Accelerated)


def off_reason(model: nn.Module, enabled: bool | None = None) -> str:
    """Why `accelerate(model, enabled)` would swap nothing ('' when it may swap). Loads the library."""
    if enabled is False:
        return "switched off: --no-accel / enabled=False"
    if os.environ.get(native.ENV) == "0":  # also after a load: the switch holds for this call
        return f"switched off: {native.ENV}=0"
    devices = sorted({str(p.device) for p in model.parameters()})
    if devices and "cpu" not in devices:
        return f"the model is on {', '.join(devices)}; the kernels are CPU-only"
    if native.load() is None:
        return f"library unavailable: {native.unavailable_reason()}"
    return ""


def accelerate(model: nn.Module, enabled: bool | None = None,
               log: Callable[[str], Any] | None = None) -> int:
    """Swap `model`'s eligible modules (see the module docstring) for accelerated ones; return how many
    of its modules are accelerated now (ones swapped before count too; a second call swaps nothing new).

    `enabled`: None or True = on unless `MOBILEYOLO_CPU_KERNELS=0`; False = off. Off, on a model with no
    CPU parameters, or without the kernels library it returns 0 and swaps nothing. Says one line,
    through `log` (default: this module's logger at INFO): how many modules of which kind, or why none.
    """
    say = log or LOGGER.info
    why = off_reason(model, enabled)
    if why:
        say(f"CPU training kernels: off ({why})")
        return 0
    ops.register()
    kinds: Counter[str] = Counter()
    for m in model.modules():
        mixin = _eligible(m)
        if mixin is not None:
            m.__class__ = accelerated_class(type(m), mixin)
        if is_accelerated(m):
            kinds["SELayer" if isinstance(m, SELayer) else "ConvBNAct"] += 1
    n = sum(kinds.values())
    if n:
        parts = ", ".join(f"{v} {k}" for k, v in sorted(kinds.items()))
        say(f"CPU training kernels: {n} modules accelerated ({parts})")
    else:
        say("CPU training kernels: none of this model's modules use them (they take ConvBNAct with ReLU, "
            f"Hardswish or no activation, depthwise convs of kernel {train_kernels.DW_MIN_K}+, and SELayer)")
    return n


def decelerate(model: nn.Module) -> int:
    """Give every accelerated module of `model` its plain class back; return how many changed."""
    n = 0
    for m in model.modules():
        if is_accelerated(m):
            m.__class__ = m.plain_class
            n += 1
    return n
