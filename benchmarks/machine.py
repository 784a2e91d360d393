"""The machine a benchmark ran on: CPU model, cores, library versions, load average, allocator settings.

Figures from benchmarks/run.py are only comparable with this description next to them.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

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


def usable_cores() -> int:
    """CPUs this process may run on (affinity/cgroup mask where the OS reports one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def load_average() -> tuple[float, float, float] | None:
    """1, 5 and 15 minute load averages (runnable processes), or None where the OS has none."""
    try:
        return os.getloadavg()
    except (OSError, AttributeError):
        return None


def _cpu_times() -> tuple[int, int] | None:
    """(idle + iowait, total) jiffies summed over all CPUs from /proc/stat, or None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    return ticks[3] + ticks[4], sum(ticks)


def idle_cpus(seconds: float = 0.5) -> float | None:
    """CPUs left idle by everything else during the next `seconds` (sampled from /proc/stat).

    Unlike the 1-minute load average, this is not inflated for a minute after the previous job
    ended: on a 2-core machine the load average still read 1.0 right after the test suite finished,
    which made `--omp auto` pick PASSIVE waits on an idle machine (35 vs 24 ms for yolov5n in PyTorch).
    None where /proc/stat is unavailable (then callers fall back to the load average).
    """
    import time

    a = _cpu_times()
    if a is None:
        return None
    time.sleep(seconds)
    b = _cpu_times()
    if b is None or b[1] <= a[1]:
        return None
    return usable_cores() * (b[0] - a[0]) / (b[1] - a[1])


def describe() -> dict[str, str]:
    """Machine facts as display strings. Keys: cpu, cores, os, python, torch, torch_threads,
    onnxruntime, opencv, numpy, load, malloc, OMP_WAIT_POLICY."""
    import cv2
    import numpy as np
    import torch

    try:
        import onnxruntime as ort

        ort_version = ort.__version__
    except ImportError:
        ort_version = "not installed"
    from utils.backend import physical_cores

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
    }


def markdown(info: dict[str, str]) -> str:
    """`describe()` as a markdown bullet list."""
    return "\n".join(f"- {k}: {v}" for k, v in info.items())
