"""Optional CPU training kernels, applied to a model from outside in one explicit step.

    from utils.accel import accelerate
    n = accelerate(model)            # after building the model; 0 when off or unavailable

Modules: `native` (build, cache and load the C library), `ops` (the `mobileyolo::` custom ops: contracts
and `register()`), `checks` (their input checks), `op_impls` (their implementations), `train_kernels`
(when a module may use them), `swap` (`accelerate`, `decelerate`, `is_accelerated`). Importing any of
them builds, loads and registers nothing: `accelerate()` (or `ops.register()`) does, on first use.
"""
from __future__ import annotations

from utils.accel.swap import accelerate, decelerate, is_accelerated

__all__ = ["accelerate", "decelerate", "is_accelerated"]
