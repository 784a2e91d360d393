"""The machine a benchmark ran on: CPU model, cores, library versions, load average, allocator settings.

Figures from benchmarks/run.py are only comparable with this description next to them.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

from utils.infer.runtime import physical_cores, usable_cores

MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else `platform.processor()`."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def load_average() -> tuple[float, float, float] | None:
    """1, 5 and 15 minute load averages (runnable processes), or None where the OS has none."""
    try:
        return os.getloadavg()
    except (OSError, AttributeError):
        return None


def describe() -> dict[str, str]:
    """Machine facts as display strings. Keys: cpu, cores, os, python, torch, torch_threads,
    onnxruntime, opencv, numpy, load, malloc, OMP_WAIT_POLICY, cpu_kernels (our C training kernels: loaded
    or why not)."""
    import cv2
    import numpy as np
    import torch

    try:
        import onnxruntime as ort

        ort_version = ort.__version__
    except ImportError:
        ort_version = "not installed"
    load = load_average()
    malloc = ", ".join(f"{k}={os.environ[k]}" for k in MALLOC_ENV if k in os.environ) or "glibc defaults"
    omp = os.environ.get("OMP_WAIT_POLICY", "default (libgomp: spin, then sleep)")
    return {
        "cpu": cpu_model(),
        "cores": f"{usable_cores()} usable ({physical_cores()} physical)",
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": str(torch.get_num_threads()),
        "onnxruntime": ort_version,
        "opencv": cv2.__version__,
        "numpy": np.__version__,
        "load": "n/a" if load is None else " / ".join(f"{v:.2f}" for v in load) + " (1 / 5 / 15 min)",
        "malloc": malloc,
        "OMP_WAIT_POLICY": omp,
        "cpu_kernels": cpu_kernels(),
    }


def cpu_kernels() -> str:
    """Whether our C training kernels (utils/accel/native.py, "train") load here, and with which compiler:
    without them training runs slower. Inference uses none of our kernels (PyTorch, ONNX Runtime, Inductor)."""
    from utils.accel import native

    state = "loaded" if native.load("train") is not None else f"unavailable ({native.unavailable_reason('train')})"
    return f"train {state} ({native.compiler() or 'no C compiler'})"


def markdown(info: dict[str, str]) -> str:
    """`describe()` as a markdown bullet list."""
    return "\n".join(f"- {k}: {v}" for k, v in info.items())
