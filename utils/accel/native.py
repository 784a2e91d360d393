"""Build and load our C kernels as shared libraries, once per machine and CPU.

One library, "train" (`cpu_train_kernels.c`; utils/accel/ops.py wraps it in checked custom ops). The C
file is compiled on first use with the system C compiler (`$CC`, else `cc`/`gcc`/`clang`),
`-O3 -march=native -fopenmp`, into a cache folder (`$MOBILEYOLO_CACHE`, else `~/.cache/mobileyolo`),
named by a hash of the source, the flags, the compiler and `cpu_id()` (the CPU's model name and feature
flags). Beside each library a sidecar file (`.cpu`) holds the `cpu_id()` it was built on, and a cached
library is loaded only when its sidecar names this CPU (else it is rebuilt): code built for one CPU's
instruction set is never run on another, whatever a shared cache or a copied folder holds. The build
writes to temporary files and `os.replace`s them, sidecar first, so concurrent first uses (DDP workers)
never see a half written library. Within a process `load()` holds a lock while it builds and loads, so
threads that ask at once get the one library object. OpenMP: the library links `libgomp.so.1`; the
dynamic loader hands it the copy PyTorch has already loaded, so its threads are PyTorch's.

Old builds do not pile up: each load marks its file as used (its mtime), and a build removes the
same library's other files that no process has loaded for `STALE_DAYS` (an older source, compiler or
flags; or a CPU that stopped using a shared cache).

Everything degrades: with no compiler, a failed build, a failed load, or `MOBILEYOLO_CPU_KERNELS=0`,
`load()` returns None (with one warning naming the cause) and callers keep PyTorch's own kernels.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

LOGGER = logging.getLogger("mobileyolo.native")
FLAGS = ("-O3", "-march=native", "-fno-trapping-math", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC", "-std=c99")
_P, _L, _I, _F = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float


@dataclass(frozen=True)
class Library:
    """One C file: `source` (next to this module), its C functions' argument types (a list: returns void)
    or (argument types, return type), compiler flags beyond FLAGS, and what it is called in warnings."""

    source: Path
    signatures: dict[str, list]
    extra_flags: tuple[str, ...] = ()
    what: str = "CPU kernels"

    @property
    def flags(self) -> tuple[str, ...]:
        return FLAGS + self.extra_flags


LIBRARIES = {
    "train": Library(Path(__file__).with_name("cpu_train_kernels.c"), {
        "bn_act_forward": ([_P, _P, _L, _L, _P, _P, _F, _I, _P, _P, _P, _F, _I], _I),
        "bn_act_backward": ([_P, _P, _P, _L, _L, _P, _P, _P, _P, _I, _P, _P, _I], _I),
        "dw_weight_grad": [_P, _P, _P, _L, _L, _L, _L, _L, _L, _L, _L, _L, _P, _I],
        "se_gate_grad": [_P, _P, _P, _L, _L, _L, _I],
        "se_input_grad": [_P, _P, _P, _P, _L, _L, _L, _I],
    }, what="CPU training kernels"),
}
ENV = "MOBILEYOLO_CPU_KERNELS"  # "0": load() builds and loads nothing (and accelerate() swaps nothing)
STALE_DAYS = 14  # a cached library nobody loaded for this long is removed by the next build of its kind
_STATE: dict[str, dict[str, object]] = {}  # kind -> {"lib": the CDLL or None once tried, "why": reason it is None}
_LOCK = threading.Lock()  # one first build + load at a time; a finished state is read without it


def cache_dir() -> Path:
    return Path(os.environ.get("MOBILEYOLO_CACHE") or Path.home() / ".cache" / "mobileyolo")


def compiler() -> str | None:
    """The C compiler to use: `$CC` when set (even if missing, so that a wrong CC is reported), else the first found."""
    if os.environ.get("CC"):
        return os.environ["CC"]
    return next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)


# /proc/cpuinfo fields that say which instructions `-march=native` may use (x86: model name and flags;
# ARM: implementer, part and features). Only the first processor's are read: all cores of a machine match.
_CPU_FIELDS = ("model name", "flags", "CPU implementer", "CPU part", "Features")


def cpu_id(cpuinfo: str | None = None) -> str:
    """This CPU's model name and feature flags as one line per field, from `cpuinfo` (the text of
    `/proc/cpuinfo`, read when None), else what `platform` knows. Libraries built with `-march=native`
    are keyed and checked on this string."""
    found: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in _CPU_FIELDS and key not in found:
            found[key] = " ".join(value.split())
    if not found:
        return f"{platform.machine()} {platform.processor()}".strip()
    return "\n".join(f"{k}: {found[k]}" for k in _CPU_FIELDS if k in found)


def library_path(cc: str, kind: str = "train") -> Path:
    """Cache file of library `kind` built by compiler `cc` for this CPU (`cpu_id()`)."""
    lib = LIBRARIES[kind]
    key = hashlib.sha256("\0".join([lib.source.read_text(), " ".join(lib.flags), cc, cpu_id()]).encode())
    return cache_dir() / f"{lib.source.stem}-{key.hexdigest()[:16]}.so"


def sidecar(path: Path) -> Path:
    """The file beside library `path` that records the `cpu_id()` it was built on."""
    return path.with_suffix(".cpu")


def built_for_this_cpu(path: Path) -> bool:
    """True when library `path` exists and its sidecar names this CPU; a missing or unreadable sidecar is False."""
    try:
        return path.is_file() and sidecar(path).read_text() == cpu_id()
    except OSError:
        return False


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build(cc: str, out: Path, kind: str = "train", source: Path | None = None) -> None:
    """Compile library `kind` (or another `source` with its flags) into `out` atomically, with its
    sidecar (this CPU's `cpu_id()`) written first; raise RuntimeError with the compiler's first error line."""
    source = source or LIBRARIES[kind].source
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        try:
            res = subprocess.run([cc, *LIBRARIES[kind].flags, str(source), "-o", tmp, "-lm"], check=False,
                                 capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise RuntimeError(f"{cc}: {e}") from None
        if res.returncode != 0:
            err = next((ln for ln in res.stderr.splitlines() if "error" in ln), res.stderr.strip()[:300])
            raise RuntimeError(f"{cc} failed on {source.name}: {err}")
        _write_atomic(sidecar(out), cpu_id())
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def prune_stale(kind: str, keep: Path, days: float = STALE_DAYS) -> list[Path]:
    """Remove library `kind`'s cached files other than `keep` that were last used over `days` ago, with
    their sidecars; return the libraries removed.

    Never raises: a file another process removed first, or a read-only cache, is left to the next build.
    """
    cutoff, removed = time.time() - days * 86400, []
    for f in keep.parent.glob(f"{LIBRARIES[kind].source.stem}-*.so"):
        try:
            if f != keep and f.stat().st_mtime < cutoff:
                f.unlink()
                removed.append(f)
                sidecar(f).unlink(missing_ok=True)
        except OSError:
            pass
    return removed


def _mark_used(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:  # a read-only shared cache: the file is just not marked
        pass


def load(kind: str = "train") -> ctypes.CDLL | None:
    """Library `kind` (built on first use), or None when unavailable; tried once per process.

    Thread-safe: the first callers wait on one lock while one of them builds and loads; all get the
    same object. A cached file is used only when `built_for_this_cpu()`; else it is rebuilt in place.
    """
    state = _STATE.get(kind)
    if state is not None:  # published whole under the lock below, so never half filled
        return state["lib"]  # type: ignore[return-value]
    with _LOCK:
        state = _STATE.get(kind)
        if state is None:
            lib, why = _try_load(kind)
            state = _STATE[kind] = {"lib": lib, "why": why}
    return state["lib"]  # type: ignore[return-value]


def _try_load(kind: str) -> tuple[ctypes.CDLL | None, str]:
    """(library, '') or (None, why): build when needed, load, set the C functions' signatures."""
    spec = LIBRARIES[kind]
    if os.environ.get(ENV) == "0":
        return None, f"disabled by {ENV}=0"
    try:
        import torch  # noqa: F401 - load PyTorch's libgomp first, so that the library shares it

        cc = compiler()
        if cc is None:
            raise RuntimeError("no C compiler found (set CC)")
        path = library_path(cc, kind)
        if not built_for_this_cpu(path):  # not built yet, or its sidecar names another CPU (or is missing)
            build(cc, path, kind)
            prune_stale(kind, path)
        _mark_used(path)
        lib = ctypes.CDLL(str(path))
        for name, sig in spec.signatures.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = sig if isinstance(sig, tuple) else (sig, None)
    except (OSError, RuntimeError, AttributeError) as e:
        LOGGER.warning("%s unavailable, using PyTorch's (slower): %s", spec.what, e)
        return None, str(e)
    return lib, ""


def unavailable_reason(kind: str = "train") -> str:
    """Why `load(kind)` returned None ('' when it loaded or was not tried)."""
    return str(_STATE.get(kind, {}).get("why", ""))


def reset() -> None:
    """Forget the loaded libraries so that the next `load()` tries again (tests, changed environment)."""
    with _LOCK:
        _STATE.clear()
