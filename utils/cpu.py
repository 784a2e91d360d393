"""What the CPU offers right now: physical and usable cores, and how many of them other work leaves idle.

Used by `utils.backend` (thread counts and ONNX Runtime spin-waiting) and the benchmarks.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

_IDLE_CACHE: dict[str, float] = {}  # last idle_cpus() sample: {"t": monotonic seconds, "idle": cpus}


def physical_cores() -> int:
    """Number of physical CPU cores (hyper-threads not counted); falls back to the logical count."""
    try:
        import psutil  # optional

        n = psutil.cpu_count(logical=False)
        if n:
            return int(n)
    except ImportError:
        pass
    try:
        cores, block = set(), {}
        for line in Path("/proc/cpuinfo").read_text().splitlines() + [""]:
            if ":" in line:
                k, v = (s.strip() for s in line.split(":", 1))
                block[k] = v
            elif block:
                cores.add((block.get("physical id"), block.get("core id")))
                block = {}
        if len(cores) > 1 or (cores and None not in next(iter(cores))):
            # a cgroup/affinity limit can be lower than the cores the machine has
            return max(1, min(len(cores), len(os.sched_getaffinity(0))))
    except (OSError, AttributeError):
        pass
    return max(1, os.cpu_count() or 1)


def usable_cores() -> int:
    """CPUs this process may run on (affinity/cgroup mask where the OS reports one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def cpu_times() -> tuple[int, int] | None:
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
    a = cpu_times()
    if a is None:
        return None
    time.sleep(seconds)
    b = cpu_times()
    if b is None or b[1] <= a[1]:
        return None
    return usable_cores() * (b[0] - a[0]) / (b[1] - a[1])


def estimate_idle(seconds: float = 0.5) -> float | None:
    """CPUs other work leaves idle: an `idle_cpus(seconds)` sample, else usable cores minus the 1-minute
    load average, else None where the OS reports neither."""
    idle = idle_cpus(seconds)
    if idle is not None:
        return idle
    try:
        return usable_cores() - os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def idle_cores(sample: float = 0.1, max_age: float = 2.0) -> int:
    """Physical cores not already kept busy by other processes (`estimate_idle`, rounded), at least 1.

    The estimate is reused for `max_age` seconds, so opening several backends costs one sample; all
    physical cores where there is no estimate. The load average alone lags: a minute after the test
    suite or a training run ended it still read ~1 on an idle 2-core machine, which halved detect.py's
    threads and turned ONNX Runtime's spin-waiting off.
    """
    cores = physical_cores()
    if "t" not in _IDLE_CACHE or time.monotonic() - _IDLE_CACHE["t"] > max_age:
        idle = estimate_idle(sample)
        if idle is None:
            return cores
        _IDLE_CACHE.update(t=time.monotonic(), idle=idle)
    return max(1, min(cores, int(_IDLE_CACHE["idle"] + 0.5)))
