"""Build and load our C kernels as shared libraries, once per machine.

Two libraries: "train" (`cpu_train_kernels.c`, utils/accel/train_kernels.py) and "infer"
(`cpu_infer_kernels.c`, utils/native_infer.py). Each C file is compiled on first use with the system C
compiler (`$CC`, else `cc`/`gcc`/`clang`), `-O3 -march=native -fopenmp`, into a cache folder
(`$MOBILEYOLO_CACHE`, else `~/.cache/mobileyolo`), named by a hash of the source, the flags, the
compiler and the CPU's feature flags: a cache shared by machines with different CPUs never hands one
a library built for the other. The build writes to a
temporary file and then `os.replace`s it, so concurrent first uses (DDP workers) cannot see a half
written library. OpenMP: the library links `libgomp.so.1`; the dynamic loader hands it the copy
PyTorch has already loaded, so its threads are PyTorch's.

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
    # -std=c99 alone turns off a*b+c contraction into FMA, which the depthwise conv's loops are made of
    "infer": Library(Path(__file__).with_name("cpu_infer_kernels.c"), {
        "dw_conv_act": [_P, _P, _P, _P, _L, _L, _L, _L, _L, _L, _I, _I, _I, _I, _I],
        "se_forward": [_P, _P, _L, _L, _L, _L, _P, _P, _P, _P, _I],
    }, extra_flags=("-ffp-contract=fast",), what="CPU inference kernels"),
}
STALE_DAYS = 14  # a cached library nobody loaded for this long is removed by the next build of its kind
_STATE: dict[str, dict[str, object]] = {}  # kind -> {"lib": the CDLL or None once tried, "why": reason it is None}


def cache_dir() -> Path:
    return Path(os.environ.get("MOBILEYOLO_CACHE") or Path.home() / ".cache" / "mobileyolo")


def compiler() -> str | None:
    """The C compiler to use: `$CC` when set (even if missing, so that a wrong CC is reported), else the first found."""
    if os.environ.get("CC"):
        return os.environ["CC"]
    return next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_path(cc: str, kind: str = "train") -> Path:
    lib = LIBRARIES[kind]
    key = hashlib.sha256("\0".join([lib.source.read_text(), " ".join(lib.flags), cc, _cpu_flags()]).encode())
    return cache_dir() / f"{lib.source.stem}-{key.hexdigest()[:16]}.so"


def build(cc: str, out: Path, kind: str = "train", source: Path | None = None) -> None:
    """Compile library `kind` (or another `source` with its flags) into `out` atomically; raise
    RuntimeError with the compiler's first error line."""
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
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def prune_stale(kind: str, keep: Path, days: float = STALE_DAYS) -> list[Path]:
    """Remove library `kind`'s cached files other than `keep` that were last used over `days` ago; return them.

    Never raises: a file another process removed first, or a read-only cache, is left to the next build.
    """
    cutoff, removed = time.time() - days * 86400, []
    for f in keep.parent.glob(f"{LIBRARIES[kind].source.stem}-*.so"):
        try:
            if f != keep and f.stat().st_mtime < cutoff:
                f.unlink()
                removed.append(f)
        except OSError:
            pass
    return removed


def _mark_used(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:  # a read-only shared cache: the file is just not marked
        pass


def load(kind: str = "train") -> ctypes.CDLL | None:
    """Library `kind` ("train" or "infer"; built on first use), or None when unavailable; tried once per process."""
    state = _STATE.setdefault(kind, {})
    if "lib" in state:
        return state["lib"]  # type: ignore[return-value]
    spec = LIBRARIES[kind]
    state["lib"], state["why"] = None, ""
    if os.environ.get("MOBILEYOLO_CPU_KERNELS") == "0":
        state["why"] = "disabled by MOBILEYOLO_CPU_KERNELS=0"
        return None
    try:
        import torch  # noqa: F401 - load PyTorch's libgomp first, so that the library shares it

        cc = compiler()
        if cc is None:
            raise RuntimeError("no C compiler found (set CC)")
        path = library_path(cc, kind)
        if not path.is_file():
            build(cc, path, kind)
            prune_stale(kind, path)
        _mark_used(path)
        lib = ctypes.CDLL(str(path))
        for name, sig in spec.signatures.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = sig if isinstance(sig, tuple) else (sig, None)
    except (OSError, RuntimeError, AttributeError) as e:
        state["why"] = str(e)
        LOGGER.warning("%s unavailable, using PyTorch's (slower): %s", spec.what, e)
        return None
    state["lib"] = lib
    return lib


def unavailable_reason(kind: str = "train") -> str:
    """Why `load(kind)` returned None ('' when it loaded or was not tried)."""
    return str(_STATE.get(kind, {}).get("why", ""))


def reset() -> None:
    """Forget the loaded libraries so that the next `load()` tries again (tests, changed environment)."""
    _STATE.clear()
