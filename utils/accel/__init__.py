"""Optional CPU training kernels, applied to a model from outside in one explicit step.

    from utils.accel import accelerate
    n = accelerate(model)            # after building the model; 0 when off or unavailable

Modules: `native` (build, cache and load the C library), `ops` (the `mobileyolo::` custom ops and their
input checks), `op_impls` (their implementations), `train_kernels` (when a module may use them),
`swap` (`accelerate`, `decelerate`, `is_accelerated`). Importing this package loads nothing and
registers nothing; `accelerate` and friends are imported on first attribute access.
"""
from __future__ import annotations

from typing import Any

__all__ = ["accelerate", "decelerate", "is_accelerated"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from utils.accel import swap as _mod

        return getattr(_mod, name)
    raise AttributeError(f"module 'utils.accel' has no attribute {name!r}")
