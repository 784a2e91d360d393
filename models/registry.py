"""Name -> block class registry and the channel-rounding rules the blocks use.

Every block the YAML parser can build is registered here with `@register("Name", "Alias", ...)`.
A registered class is a `Block`: besides being an `nn.Module` it declares, as class data and one
classmethod, how a YAML row turns into constructor arguments:

- `yaml_args = (min, max)`: how many YAML args the row may carry (checked by the parser).
- `depth_rule`: what the row's `number` means under `depth_multiple`:
  `"repeat"` (stack `n` copies in sequence), `"arg"` (pass `n` to the constructor, e.g. C3),
  `"none"` (`n` must be 1).
- `takes_list`: forward receives a list of tensors (Concat, Detect) rather than one tensor.
- `channels(c_in, args, width) -> (ctor_args, c_out)`: `c_in` lists the channels of the row's
  inputs (one per `from` entry), `args` the YAML args with names already resolved, `width` the
  model's `width_multiple`. Returns the positional arguments for `__init__` and the output channels.
  Raise `ValueError` for a bad row; the parser adds file, row index and row to the message.
"""
from __future__ import annotations

import difflib
import math
from typing import Any, ClassVar, TypeVar
from collections.abc import Callable

from torch import nn

from utils.core.errors import UserError

REGISTRY: dict[str, type] = {}

T = TypeVar("T", bound=type)


class ModelConfigError(UserError, ValueError):
    """A model YAML (or dict) that cannot be built; the message names file, row index and row."""


def register(*names: str) -> Callable[[T], T]:
    """Class decorator: register the class under every name in `names` (refusing duplicates)."""
    if not names:
        raise ValueError("register() needs at least one name")

    def deco(cls: T) -> T:
        for name in names:
            old = REGISTRY.get(name)
            # the same class defined again (module reload) replaces itself; anything else is a clash
            same = old is not None and (old.__module__, old.__qualname__) == (cls.__module__, cls.__qualname__)
            if old is not None and old is not cls and not same:
                raise ValueError(f"module name {name!r} is already registered to "
                                 f"{REGISTRY[name].__module__}.{REGISTRY[name].__qualname__}")
        for name in names:
            REGISTRY[name] = cls
        return cls

    return deco


def close_matches(name: str, n: int = 5) -> list[str]:
    """Registered names resembling `name` (case-insensitive), best first."""
    lowered = {k.lower(): k for k in REGISTRY}
    hits = difflib.get_close_matches(name.lower(), list(lowered), n=n, cutoff=0.5)
    return [lowered[h] for h in hits]


def lookup(name: str) -> type:
    """Registered class for `name`; `KeyError` whose message lists close matches."""
    if name in REGISTRY:
        return REGISTRY[name]
    near = close_matches(name)
    hint = f"; did you mean {', '.join(near)}?" if near else ""
    raise KeyError(f"unknown module {name!r}{hint}")


def ceil8(c: float, divisor: int = 8) -> int:
    """YOLOv5's width rounding: ceil to a multiple of `divisor` (used by Conv, C3, SPPF, ...)."""
    return int(math.ceil(c / divisor) * divisor)


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """torchvision/TF-slim rounding: nearest multiple of `divisor`, never more than 10% below `v`.

    MobileNetV3 blocks use this rule so that width-scaled configs match torchvision's models.
    """
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class Block(nn.Module):
    """Base of registered blocks: defaults for the parser hooks (see module docstring)."""

    yaml_args: ClassVar[tuple[int, int]] = (0, 99)
    depth_rule: ClassVar[str] = "repeat"
    takes_list: ClassVar[bool] = False  # forward(list of tensors), even for a single `from`

    @classmethod
    def channels(cls, c_in: list[int], args: list[Any], width: float) -> tuple[list[Any], int]:
        raise NotImplementedError(f"{cls.__name__} does not declare its channel rule")

    @staticmethod
    def one_input(c_in: list[int]) -> int:
        """The single input channel count, or `ValueError` if the row has several inputs."""
        if len(c_in) != 1:
            raise ValueError(f"expects exactly one input, got {len(c_in)} (from has {len(c_in)} entries)")
        return c_in[0]
