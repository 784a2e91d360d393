"""CPU inference compiled ahead of the first frame: torch.compile (Inductor, weights frozen, C++ wrapper).

Eager PyTorch pays a fixed cost per op (dispatch, oneDNN primitive setup, a Python module call), and
for a small batch-1 model that fixed cost is most of the time (docs/PERFORMANCE.md). Inductor with
`freezing` folds the weights into constants and pre-packs them for oneDNN, fuses the elementwise ops
(hard-swish, squeeze-excite's gate, the decode's sigmoid and grid arithmetic) into generated C++ loops,
and `cpp_wrapper` runs the whole graph from C++ instead of Python (benchmarks/run.py's "PyTorch
compiled" column).

The price is a compile on first use (seconds; Inductor's on-disk cache makes a second process faster)
and one graph per input shape. `CompiledDecoder` therefore compiles for one shape and runs every other
shape through the eager model, so a stream of same-sized frames never recompiles. Everything degrades
to eager: no C++ compiler, an Inductor error or a result that disagrees with the eager model logs a
warning and returns None.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from torch import nn

from utils.core.errors import first_line as _first_line

LOGGER = logging.getLogger("mobileyolo.backend")
# Inductor settings for our compiles only, patched around the compiling call (so nothing global stays
# flipped). Not torch.compile(options=...): in torch 2.14 that silently drops `freezing` (MobileNetV3-Small's
# 49 convs then stayed plain aten calls instead of packed oneDNN ones with fused activations).
OPTIONS = {"freezing": True, "cpp_wrapper": True}
_NOISY_LOGGERS = ("torch.utils.cpp_extension", "torch._inductor", "torch._dynamo")


class CompiledDecoder:
    """`decoder(x)` compiled for one input shape and layout; other inputs run `decoder` itself.

    `decoder`: eval model returning decoded `[B, N, 5 + nc]` (utils.ops.decode.Decoder), float32 on the CPU,
    parameters without gradients. Call `CompiledDecoder.build` rather than the constructor: it compiles,
    checks the result against eager and returns None when either fails. `seconds`: compile time.
    """

    def __init__(self, decoder: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor] | None,
                 example: torch.Tensor, seconds: float) -> None:
        self.decoder, self.fn, self.seconds = decoder, fn, seconds
        self.shape, self.strides = example.shape, example.stride()  # the graph's guards: no recompiles

    @classmethod
    @torch.no_grad()
    def build(cls, decoder: nn.Module, example: torch.Tensor, rtol: float = 1e-4,
              atol: float = 1e-3) -> CompiledDecoder | None:
        """Compile `decoder` for `example`'s shape ([B, 3, H, W]) and check it; None on any failure."""
        if example.device.type != "cpu" or any(p.dtype != torch.float32 for p in decoder.parameters()):
            return None
        levels = {name: logging.getLogger(name).level for name in _NOISY_LOGGERS}
        t0 = time.perf_counter()
        try:
            for name in _NOISY_LOGGERS:  # e.g. "No CUDA runtime is found" on every CPU-only compile
                logging.getLogger(name).setLevel(logging.ERROR)
            import torch._inductor.config as inductor_config

            fn = torch.compile(decoder, dynamic=False, fullgraph=True)
            with _recompile_room(), inductor_config.patch(OPTIONS):  # compiles on this first call
                out = fn(example)
            ref = decoder(example)
        except Exception as e:  # Inductor raises many types (no compiler, codegen, C++ build): all mean eager
            LOGGER.warning(f"torch.compile failed ({type(e).__name__}: {_first_line(e)}); using the eager model")
            return None
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
        seconds = time.perf_counter() - t0
        if out.shape != ref.shape or not torch.allclose(out, ref, rtol=rtol, atol=atol):
            err = (out - ref).abs().max().item() if out.shape == ref.shape else f"shape {tuple(out.shape)}"
            LOGGER.warning(f"torch.compile result disagrees with the eager model (max error {err}); "
                           f"using the eager model")
            return None
        return cls(decoder, fn, example, seconds)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Decoded `[B, N, 5 + nc]`: the compiled graph for the compiled shape, eager otherwise."""
        if (self.fn is not None and x.shape == self.shape and x.device.type == "cpu" and x.dtype == torch.float32
                and self._same_layout(x)):
            # same memory, but the graph guards on exact strides, and a size-1 dim's stride is arbitrary
            # (detect.to_tensor's batch dim has stride 3): restride rather than recompile or run eager
            try:
                return self.fn(x if x.stride() == self.strides else x.as_strided(self.shape, self.strides))
            except Exception as e:  # a guard that stopped holding would recompile: never stop a long run for it
                LOGGER.warning(f"compiled model failed ({type(e).__name__}: {_first_line(e)}); "
                               f"running eager from now on")
                self.fn = None
        return self.decoder(x)

    def _same_layout(self, x: torch.Tensor) -> bool:
        return all(a == b for n, a, b in zip(self.shape, x.stride(), self.strides) if n > 1)


def _recompile_room():
    """Scoped room for one more graph of the same code: every `Decoder.forward` compile is an entry of
    that one function in Dynamo's cache, and past its limit (8) a fullgraph compile fails; the
    benchmark compiles 12 (model, size) pairs in one process."""
    import torch._dynamo

    return torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.recompile_limit + 64)
