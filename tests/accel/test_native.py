"""utils/accel/native.py: build, cache keyed and checked on the CPU, prune, thread-safe load."""
from __future__ import annotations

import os
import threading
import time

import pytest

from tests.accel.helpers import needs_cc
from utils.accel import native

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz
flags\t\t: fpu sse sse2 avx avx2 avx512f
processor\t: 1
model name\t: Something Else
flags\t\t: fpu sse
"""


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """An empty cache folder for this test; the process's loaded state is forgotten before and after."""
    monkeypatch.setenv("MOBILEYOLO_CACHE", str(tmp_path))
    native.reset()
    yield tmp_path
    native.reset()


def test_disabled_by_environment(monkeypatch, cache):
    monkeypatch.setenv("MOBILEYOLO_CPU_KERNELS", "0")
    assert native.load() is None
    assert "MOBILEYOLO_CPU_KERNELS=0" in native.unavailable_reason()
    assert not list(cache.iterdir())  # nothing built


def test_only_the_training_library_is_left():
    assert list(native.LIBRARIES) == ["train"]
    assert native.LIBRARIES["train"].source.is_file()


def test_cpu_id_has_the_first_processors_model_and_flags():
    cid = native.cpu_id(CPUINFO)
    assert cid == "model name: Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz\nflags: fpu sse sse2 avx avx2 avx512f"
    arm = native.cpu_id("processor : 0\nFeatures : fp asimd\nCPU implementer : 0x41\nCPU part : 0xd0c\n")
    assert arm == "CPU implementer: 0x41\nCPU part: 0xd0c\nFeatures: fp asimd"
    assert native.cpu_id("") != ""  # no cpuinfo: what `platform` knows


def test_another_cpu_gets_another_file(monkeypatch):
    mine = native.library_path("cc")
    monkeypatch.setattr(native, "cpu_id", lambda cpuinfo=None: "flags: sse2")
    other = native.library_path("cc")
    monkeypatch.setattr(native, "cpu_id", lambda cpuinfo=None: "model name: Another CPU\nflags: sse2")
    same_flags_other_model = native.library_path("cc")
    assert len({mine, other, same_flags_other_model}) == 3
    assert mine.parent == other.parent and other.name.startswith("cpu_train_kernels-")


@needs_cc
def test_build_failure_names_file_and_compiler(tmp_path):
    bad = tmp_path / "broken.c"
    bad.write_text("void f(void) { this is not C; }\n")
    with pytest.raises(RuntimeError, match=r"broken\.c") as e:
        native.build(native.compiler(), tmp_path / "out.so", source=bad)
    assert native.compiler() in str(e.value) and "error" in str(e.value)
    assert not list(tmp_path.glob("*.so")) and not list(tmp_path.glob("*.tmp"))


@needs_cc
def test_build_into_cache_is_keyed_checked_and_reused(cache):
    lib = native.load()
    assert lib is not None, native.unavailable_reason()
    path = native.library_path(native.compiler())
    assert sorted(cache.iterdir()) == sorted([path, native.sidecar(path)])  # no temporary file left
    assert path.name.startswith("cpu_train_kernels-") and path.suffix == ".so"
    assert native.sidecar(path).read_text() == native.cpu_id() and native.built_for_this_cpu(path)
    inode = path.stat().st_ino
    native.reset()
    assert native.load() is not None and path.stat().st_ino == inode  # reused, not rebuilt


@needs_cc
def test_a_library_built_on_another_cpu_is_never_loaded(cache, monkeypatch):
    """A cached file whose sidecar names another CPU (a shared or copied cache), or has no sidecar, is
    rebuilt before anything loads it; and a CPU with other flags never even looks at this CPU's file."""
    assert native.load() is not None, native.unavailable_reason()
    path = native.library_path(native.compiler())
    native.sidecar(path).write_text("model name: Another CPU\nflags: fpu avx512f")
    assert not native.built_for_this_cpu(path)
    inode = path.stat().st_ino
    native.reset()
    assert native.load() is not None
    assert path.stat().st_ino != inode and native.sidecar(path).read_text() == native.cpu_id()
    native.sidecar(path).unlink()
    assert not native.built_for_this_cpu(path)  # no sidecar: not known to be ours

    monkeypatch.setattr(native, "cpu_id", lambda cpuinfo=None: "model name: Another CPU\nflags: fpu sse2")
    native.reset()
    assert native.load() is not None
    theirs = native.library_path(native.compiler())
    assert theirs != path and native.sidecar(theirs).read_text() == "model name: Another CPU\nflags: fpu sse2"


@needs_cc
def test_a_build_removes_the_same_librarys_stale_files_only(cache):
    old = time.time() - (native.STALE_DAYS + 1) * 86400
    stale, recent = (cache / f"cpu_train_kernels-{d * 16}.so" for d in "01")
    other_kind = cache / "cpu_infer_kernels-0000000000000000.so"  # another library: not this build's to prune
    for f in (stale, native.sidecar(stale), recent, other_kind):
        f.write_bytes(b"old build")
    for f in (stale, other_kind):
        os.utime(f, (old, old))
    assert native.load() is not None, native.unavailable_reason()
    path = native.library_path(native.compiler())
    assert sorted(cache.iterdir()) == sorted([path, native.sidecar(path), recent, other_kind])
    os.utime(path, (old, old))  # a load marks the library it uses as used, so it is never stale itself
    native.reset()
    assert native.load() is not None and path.stat().st_mtime > old + 86400
    assert native.prune_stale("train", keep=path, days=0) == [recent] and path.exists()


def test_two_threads_loading_at_once_get_one_library(monkeypatch):
    """Both threads enter load() together; one builds and loads (slowly), the other waits for it."""
    calls = []
    real = native._try_load

    def slow(kind):
        calls.append(kind)
        time.sleep(0.2)  # a wide window in which the second thread would start its own load
        return real(kind)

    monkeypatch.setattr(native, "_try_load", slow)
    native.reset()
    start, got = threading.Barrier(2), []

    def worker():
        start.wait()
        got.append(native.load())

    try:
        threads = [threading.Thread(target=worker) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert len(got) == 2 and got[0] is got[1] and calls == ["train"]
        assert native.load() is got[0]
    finally:
        native.reset()
