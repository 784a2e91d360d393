"""utils.infer.runtime: core counts, idle-core sampling, glibc allocator tuning and `apply_policy`, the one
place that sets process-wide inference state (torch threads, allocator) on a script's behalf."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.backend_helpers import make_checkpoint
from utils.core.errors import FlagError
from utils.infer import runtime
from utils.infer.backend import DetectBackend

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def policy_on(monkeypatch):
    """tests/conftest.py switches the policy off for the suite; here it is the subject."""
    monkeypatch.delenv("MOBILEYOLO_RUNTIME_POLICY", raising=False)


@pytest.fixture()
def torch_threads():
    """Restore torch's intra-op threads after a test that lets apply_policy change them."""
    n = torch.get_num_threads()
    yield n
    torch.set_num_threads(n)


@pytest.fixture()
def fake_idle(monkeypatch):
    """Pretend `n` physical cores are idle: `fake_idle(n)`; no /proc/stat sample is taken."""
    monkeypatch.setattr(runtime, "_IDLE_CACHE", {})

    def set_idle(n: int) -> None:
        monkeypatch.setattr(runtime, "idle_cores", lambda *a, **k: n)
    return set_idle


# ---- cores and idle cores ------------------------------------------------------------------------
def test_core_counts_are_sane():
    assert 1 <= runtime.physical_cores() <= (os.cpu_count() or 1)
    assert 1 <= runtime.usable_cores() <= (os.cpu_count() or 1)


def test_idle_cpus_reads_proc_stat(monkeypatch):
    """Idle share of the jiffies between two /proc/stat reads, times the usable cores."""
    reads = iter([(100, 400), (150, 500)])  # 50 of 100 jiffies idle
    monkeypatch.setattr(runtime, "cpu_times", lambda: next(reads))
    monkeypatch.setattr(runtime, "usable_cores", lambda: 2)
    assert runtime.idle_cpus(0.0) == pytest.approx(1.0)
    monkeypatch.setattr(runtime, "cpu_times", lambda: None)
    assert runtime.idle_cpus(0.0) is None
    reads = iter([(100, 400), (100, 400)])  # no time passed between the reads: no answer, not a division by 0
    monkeypatch.setattr(runtime, "cpu_times", lambda: next(reads))
    assert runtime.idle_cpus(0.0) is None
    monkeypatch.undo()
    if Path("/proc/stat").exists():  # the real file: a share of this machine's cores
        assert runtime.cpu_times() is not None
        assert 0.0 <= runtime.idle_cpus(0.05) <= runtime.usable_cores()


def test_idle_cores_follows_the_load_average(monkeypatch):
    """Where /proc/stat cannot be sampled, the 1-minute load average decides."""
    monkeypatch.setattr(runtime, "idle_cpus", lambda seconds=0.1: None)
    monkeypatch.setattr(runtime, "_IDLE_CACHE", {})
    cores = runtime.physical_cores()
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert runtime.idle_cores(max_age=0.0) == cores
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (cores + 3.0, 0.0, 0.0))
    assert runtime.idle_cores(max_age=0.0) == 1  # never below one

    def no_load() -> tuple[float, float, float]:
        raise OSError("no load average here")
    monkeypatch.setattr(runtime.os, "getloadavg", no_load)
    assert runtime.estimate_idle(0.0) is None
    assert runtime.idle_cores(max_age=0.0) == cores  # no estimate at all: every physical core


def test_idle_cores_prefers_a_fresh_sample_to_the_lagging_load_average(monkeypatch):
    samples = []

    def sample(seconds=0.1):
        samples.append(seconds)
        return 1.9  # the other core is idle too

    monkeypatch.setattr(runtime, "physical_cores", lambda: 2)
    monkeypatch.setattr(runtime, "idle_cpus", sample)
    monkeypatch.setattr(runtime, "_IDLE_CACHE", {})
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (1.4, 1.0, 0.5))  # a finished job's echo
    assert runtime.idle_cores() == 2 and runtime.idle_cores() == 2
    assert len(samples) == 1  # the second call reused the sample (max_age)
    assert runtime.idle_cores(max_age=0.0) == 2 and len(samples) == 2
    monkeypatch.setattr(runtime, "idle_cpus", lambda seconds=0.1: 0.3)  # another process holds both cores
    assert runtime.idle_cores(max_age=0.0) == 1


def test_spin_ok_only_while_the_threads_find_idle_cores(fake_idle):
    fake_idle(1)
    assert runtime.spin_ok(1) and not runtime.spin_ok(2)
    fake_idle(4)
    assert runtime.spin_ok(2) and runtime.spin_ok(4) and not runtime.spin_ok(5)


# ---- allocator ----------------------------------------------------------------------------------
def test_tune_malloc_honours_the_opt_out(monkeypatch):
    monkeypatch.setattr(runtime, "_malloc_tuned", False)
    monkeypatch.setenv("MOBILEYOLO_MALLOC_TUNE", "0")
    assert runtime.tune_malloc() is False and runtime._malloc_tuned is False


def _fresh_python(code: str, **env: str) -> list[str]:
    """stdout words of `code` run in a new interpreter (process-wide settings must not leak into pytest's),
    with no MALLOC_* / MOBILEYOLO_* variables but `env`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "MOBILEYOLO_"))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**clean, **env}, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt only")
def test_tune_malloc_and_apply_policy_tune_once_on_glibc():
    code = ("from utils.infer.runtime import apply_policy, tune_malloc; "
            "print(tune_malloc(), tune_malloc(), apply_policy(threads=1).malloc)")
    assert _fresh_python(code) == ["True", "True", "True"]


# ---- apply_policy -------------------------------------------------------------------------------
def test_apply_policy_sets_the_threads_asked_for(torch_threads, fake_idle, monkeypatch):
    monkeypatch.setattr(runtime, "tune_malloc", lambda: True)
    fake_idle(1)  # a busy machine does not override an explicit request
    p = runtime.apply_policy(threads=3)
    assert torch.get_num_threads() == 3 and p == runtime.Policy(threads=3, malloc=True, spin=False)
    fake_idle(8)
    p = runtime.apply_policy(threads=2, malloc=False)
    assert torch.get_num_threads() == 2 and p == runtime.Policy(threads=2, malloc=False, spin=True)


def test_apply_policy_never_uses_more_threads_than_idle_cores(torch_threads, fake_idle, monkeypatch):
    monkeypatch.setattr(runtime, "tune_malloc", lambda: False)  # e.g. off glibc
    monkeypatch.setattr(runtime, "physical_cores", lambda: 4)
    torch.set_num_threads(4)
    fake_idle(1)  # other work holds three cores
    p = runtime.apply_policy()
    assert torch.get_num_threads() == 1 and p == runtime.Policy(threads=1, malloc=False, spin=False)
    torch.set_num_threads(2)
    fake_idle(8)  # only ever lowers the caller's setting
    p = runtime.apply_policy()
    assert torch.get_num_threads() == 2 and p == runtime.Policy(threads=2, malloc=False, spin=True)
    fake_idle(3)  # ONNX Runtime's default threads (the 4 physical cores) may spin only with 4 idle
    assert runtime.apply_policy().spin is False and torch.get_num_threads() == 2


def test_apply_policy_off_switch_changes_nothing(torch_threads, fake_idle, monkeypatch):
    monkeypatch.setenv("MOBILEYOLO_RUNTIME_POLICY", "0")
    monkeypatch.setattr(runtime, "tune_malloc", lambda: pytest.fail("the off switch must not tune malloc"))
    fake_idle(1)
    torch.set_num_threads(2)
    p = runtime.apply_policy()
    assert torch.get_num_threads() == 2 and p == runtime.Policy(threads=2, malloc=False, spin=False)
    p = runtime.apply_policy(threads=3)  # not even an explicit thread count
    assert torch.get_num_threads() == 2 and p.threads == 2
    monkeypatch.setenv("MOBILEYOLO_RUNTIME_POLICY", "1")  # any other value: the policy applies
    assert runtime.apply_policy(threads=1, malloc=False).threads == 1 and torch.get_num_threads() == 1


@pytest.mark.parametrize("policy", ["0", "1"])
def test_apply_policy_refuses_fewer_than_one_thread(torch_threads, monkeypatch, policy):
    """Checked before anything is set, with the policy on or off: torch would take 0 or -1 threads silently."""
    monkeypatch.setenv("MOBILEYOLO_RUNTIME_POLICY", policy)
    torch.set_num_threads(2)
    for bad in (0, -1):
        with pytest.raises(FlagError, match=f"--threads must be >= 1, got {bad}"):
            runtime.apply_policy(threads=bad)
    assert torch.get_num_threads() == 2


def test_apply_policy_leaves_malloc_alone_when_asked(torch_threads, fake_idle, monkeypatch):
    monkeypatch.setattr(runtime, "_malloc_tuned", False)
    monkeypatch.setenv("MOBILEYOLO_MALLOC_TUNE", "0")  # tune_malloc's own opt-out
    assert runtime.apply_policy(threads=1).malloc is False and runtime._malloc_tuned is False
    monkeypatch.delenv("MOBILEYOLO_MALLOC_TUNE")
    monkeypatch.setattr(runtime, "tune_malloc", lambda: pytest.fail("malloc=False must not tune"))
    assert runtime.apply_policy(threads=1, malloc=False).malloc is False


# ---- the library leaves process state alone ----------------------------------------------------------
def test_detect_backend_leaves_torch_threads_and_the_allocator_alone(tmp_path, torch_threads, fake_idle,
                                                                      monkeypatch):
    import export

    pt = make_checkpoint(tmp_path / "tiny.pt", imgsz=64)
    onnx_file = export.run(pt, ("onnx",), imgsz=64, outdir=tmp_path, threads=1)["onnx"]
    monkeypatch.setattr(runtime, "tune_malloc", lambda: pytest.fail("a backend must not tune malloc"))
    fake_idle(1)  # a busy machine: the old backend lowered torch's threads here
    torch.set_num_threads(2)
    for f, kw in ((pt, {}), (pt, {"threads": 3}), (pt, {"compile": True}), (onnx_file, {"threads": 1})):
        b = DetectBackend(f, **kw)
        assert torch.get_num_threads() == 2, (f.name, kw)
        if b.fmt == "pt" and not kw:
            b(torch.rand(1, 3, 64, 64))  # nor does the first call
            assert torch.get_num_threads() == 2
