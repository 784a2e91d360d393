"""Runtime policy for CPU inference, applied by the scripts' `main()` (never by a constructor).

What the CPU offers right now (physical and usable cores, how many other work leaves idle) and the
process-wide settings that follow from it: torch's thread count and glibc's allocator thresholds
(`apply_policy`), and whether ONNX Runtime may spin-wait (`spin_ok`). Library code (`DetectBackend`,
the Python API) leaves all of these to the caller.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from utils.core.errors import FlagError

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
    which made `--omp auto` pick PASSIVE waits on an idle machine.
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


# glibc allocator settings for inference. By default glibc serves blocks above 128 KiB-32 MiB (an adaptive
# threshold) with fresh mmap()s and returns freed heap tops to the OS, so every forward pass re-faults
# and re-zeroes its activation buffers; keeping them in the heap makes batch-1 inference markedly faster
# (benchmarks/run.py, docs/PERFORMANCE.md). 32 MiB is the largest mmap threshold glibc accepts on 64-bit.
MALLOC_SETTINGS = {"MALLOC_MMAP_THRESHOLD_": 32 * 2**20, "MALLOC_TRIM_THRESHOLD_": 512 * 2**20}
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt() parameter numbers from glibc's malloc.h
_malloc_tuned = False


def tune_malloc() -> bool:
    """Apply `MALLOC_SETTINGS` to this process through glibc's `mallopt` (once); True when applied.

    The same as starting Python with those environment variables, which take precedence: a setting
    already in the environment is left alone. A no-op (False) off glibc (macOS, Windows, musl) and
    when the environment has `MOBILEYOLO_MALLOC_TUNE=0` (to measure or keep glibc's defaults).
    Effect: the process keeps up to 512 MiB of freed memory for reuse instead of returning it.
    """
    global _malloc_tuned
    if _malloc_tuned:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("MOBILEYOLO_MALLOC_TUNE") == "0":
        return False
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    ok = True
    for key, param in (("MALLOC_MMAP_THRESHOLD_", _M_MMAP_THRESHOLD), ("MALLOC_TRIM_THRESHOLD_", _M_TRIM_THRESHOLD)):
        if key not in os.environ:
            ok = bool(mallopt(param, MALLOC_SETTINGS[key])) and ok
    _malloc_tuned = ok
    return ok


@dataclass(frozen=True)
class Policy:
    """What `apply_policy` set: torch's intra-op `threads`, whether `malloc` tuning took, `spin` for ONNX Runtime."""
    threads: int
    malloc: bool
    spin: bool


def spin_ok(threads: int) -> bool:
    """Whether `threads` ONNX Runtime threads may spin-wait: only while that many cores are idle.

    Spinning threads answer the next op sooner, but on a busy machine they steal the cores others need.
    """
    return idle_cores() >= threads


def apply_policy(threads: int | None = None, malloc: bool = True) -> Policy:
    """Set this process's runtime policy for inference; call it once from a script's `main()`.

    torch's intra-op threads: `threads`, or when None never more than `idle_cores()` (torch's OpenMP
    threads spin while they wait for each other, so on a machine other work keeps busy a batch-1 pass on
    more threads than idle cores ran many times slower). `malloc`: `tune_malloc()`.
    Off switch: `MOBILEYOLO_RUNTIME_POLICY=0` changes nothing (threads, allocator) and reports spin False.
    Raises `FlagError` for `threads` below 1 (the `--threads` flag), whether or not the policy is off.
    """
    if threads is not None and int(threads) < 1:
        raise FlagError(f"--threads must be >= 1, got {threads}")
    if os.environ.get("MOBILEYOLO_RUNTIME_POLICY") == "0":
        return Policy(torch.get_num_threads(), False, False)
    if threads:
        torch.set_num_threads(int(threads))
    else:
        torch.set_num_threads(max(1, min(torch.get_num_threads(), idle_cores())))
    n = torch.get_num_threads()
    tuned = tune_malloc() if malloc else False
    return Policy(n, tuned, spin_ok(threads or physical_cores()))
