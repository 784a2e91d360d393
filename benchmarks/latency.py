"""Batch-1 CPU latency of detector YAMLs through `DetectBackend`, the object detect.py and val.py call.

For each YAML a randomly initialised model is saved as a checkpoint (`.pt`) and exported with export.py
to a static ONNX file at each size. PyTorch runs the `.pt` as detect.py does (fused, eval,
channels_last, inference_mode, decode included), and again as `detect.py --compile` does (torch.compile
of model + decode, utils/infer/compiled.py); ONNX Runtime runs the `.onnx` (ORT_ENABLE_ALL, decode inside
the graph). Every (model, format) pair is timed round-robin, one call each per round, so a change
of machine load hits all of them alike and their ratios stay meaningful on a shared machine.
"""
from __future__ import annotations

import contextlib
import io
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable

import torch
from tqdm import tqdm

FORMATS = ("pt", "ptc", "onnx")  # ptc: the .pt through DetectBackend(compile=True), detect.py --compile


@dataclass
class Prepared:
    """One YAML ready to time: its checkpoint, ONNX files per size and size figures."""

    cfg: Path
    pt: Path
    onnx: dict[int, Path] = field(default_factory=dict)
    params: int = 0
    gflops: dict[int, float] = field(default_factory=dict)


def checkpoint_for(cfg: str | Path, folder: Path, nc: int | None = None, imgsz: int = 320) -> tuple[Path, torch.nn.Module]:
    """Build `cfg` with random weights (seed 0), save it as `<folder>/<stem>.pt`; return (path, model)."""
    from models.yolo import Model
    from models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    m = Model(cfg, nc=nc)
    names = m.names or [str(i) for i in range(m.detect.nc)]
    pt = folder / f"{Path(cfg).stem}.pt"
    save_checkpoint({"model": m.state_dict(), "ema": None, "yaml": m.yaml, "names": names,
                     "anchors": m.detect.anchors, "stride": m.stride, "hyp": {}, "args": {"imgsz": imgsz},
                     "epoch": -1, "optimizer": None, "best_fitness": 0.0}, pt)
    return pt, m


def prepare(cfgs: list[str | Path], sizes: list[int], folder: Path, nc: int | None = None,
            threads: int = 2, onnx: bool = True) -> list[Prepared]:
    """Checkpoints, params (unfused), GFLOPs (batch 1) and static ONNX exports for every size."""
    import export
    from models.summary import count_params, gflops

    out = []
    logging.getLogger("mobileyolo.export").setLevel(logging.WARNING)  # export.py logs a line per file
    for cfg in tqdm(cfgs, desc="build + export", leave=False):
        pt, m = checkpoint_for(cfg, folder, nc, sizes[0])
        p = Prepared(Path(cfg), pt, params=count_params(m))  # before fusing: as `models/yolo.py --cfg` counts
        m.fuse().eval()
        for s in sizes:
            p.gflops[s] = gflops(m, s)
            if onnx:
                sub = folder / str(s)
                sub.mkdir(exist_ok=True)
                with contextlib.redirect_stdout(io.StringIO()):  # export prints a parity line per file
                    p.onnx[s] = export.run(pt, ("onnx",), imgsz=s, outdir=sub, threads=threads)["onnx"]
        out.append(p)
    return out


def interleaved_rounds(fns: dict[str, Callable[[], object]], runs: int, warmup: int = 5,
                       desc: str = "timing", block: int = 5, rewarm: int = 3) -> dict[str, list[list[float]]]:
    """Milliseconds per callable and round: `{name: [[ms, ...] per round]}`, at least `runs` calls each.

    Each round gives every callable `rewarm` untimed calls and then `block` timed ones, callables in
    turn. Rounds spread a slow spell of the machine over all of them (and let callers pair callables
    round by round). The untimed calls measure the steady state a detect.py stream runs in: after
    the other models ran, caches hold their weights and the thread pools they left spinning (libgomp's
    and ONNX Runtime's both spin for a while) still hold the cores. Without them, interleaving all six
    detectors skewed the paired ratios against timing two models alone (docs/PERFORMANCE.md).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    block = max(1, min(block, runs))
    times: dict[str, list[list[float]]] = {k: [] for k in fns}
    for _ in tqdm(range(-(-runs // block)), desc=desc, leave=False):
        for k, fn in fns.items():
            for _ in range(rewarm):
                fn()
            got = []
            for _ in range(block):
                t = time.perf_counter()
                fn()
                got.append((time.perf_counter() - t) * 1e3)
            times[k].append(got)
    return times


def interleaved_medians(fns: dict[str, Callable[[], object]], runs: int, warmup: int = 5,
                        desc: str = "timing", block: int = 5, rewarm: int = 3) -> dict[str, float]:
    """Median milliseconds per callable over all its timed calls in `interleaved_rounds`."""
    rounds = interleaved_rounds(fns, runs, warmup, desc, block, rewarm)
    return {k: statistics.median(t for r in v for t in r) for k, v in rounds.items()}


def paired_ratio(a: list[list[float]], b: list[list[float]]) -> tuple[float, float, float]:
    """Median, 25th and 75th percentile over rounds of (median of `a`'s block / median of `b`'s block).

    Both callables ran in the same rounds, so each round's ratio compares them under the same machine
    load; its spread says how firmly a run supports a verdict on the ratio.
    """
    if not a or len(a) != len(b):
        raise ValueError(f"paired_ratio: need the same non-zero number of rounds, got {len(a)} and {len(b)}")
    r = sorted(statistics.median(x) / statistics.median(y) for x, y in zip(a, b))
    q = statistics.quantiles(r, n=4, method="inclusive") if len(r) > 1 else [r[0]] * 3
    return statistics.median(r), q[0], q[2]


def _block_order(key: str, adjacent: tuple[str, ...], stems: list[str]) -> tuple[int, int]:
    """Sort key of a `'stem|fmt'` block in `time_all`'s rounds: format first, then `adjacent`, then the rest."""
    stem, fmt = key.split("|")
    rank = adjacent.index(stem) if stem in adjacent else len(adjacent) + stems.index(stem)
    return FORMATS.index(fmt), rank


def time_all(prepared: list[Prepared], sizes: list[int], runs: int = 30, threads: int = 2,
             warmup: int = 5, malloc: bool = True, spin: bool | None = None,
             spins: set[bool] | None = None,
             rounds: dict[tuple[str, str, int], list[list[float]]] | None = None, compile: bool = True,
             compile_s: dict[tuple[str, int], float | None] | None = None,
             adjacent: tuple[str, ...] = ()) -> dict[tuple[str, str, int], float]:
    """Median ms keyed by (cfg stem, format, size); formats 'pt', 'ptc' (with `compile`) and 'onnx'
    (when exported).

    The process's runtime policy is applied first, as detect.py's `main()` does (`utils.infer.runtime.
    apply_policy`: torch on `threads` threads, glibc allocator tuning when `malloc`). `spin`: ONNX Runtime
    spin-waiting (None = `runtime.spin_ok(threads)`, the scripts' busy-machine rule, decided per session);
    `spins`, when given, collects what the ONNX sessions used;
    `rounds`, when given, receives the per-round times (`interleaved_rounds`) under the same keys;
    `compile_s`, when given, receives each compile's seconds under (cfg stem, size), None where
    torch.compile failed (its 'ptc' figure is then the eager fallback's, and is left out).
    Each round times format by format (every model's pt block, then every ptc, then every onnx), and
    within a format the cfg stems in `adjacent` first, in that order: the blocks whose ratios the
    caller pairs round by round then run back to back, under the same spell of a shared machine (model
    by model, the paired blocks were eight blocks apart and the paired ratio's spread was wide).
    """
    from utils.infer.backend import DetectBackend
    from utils.infer.runtime import apply_policy, spin_ok

    apply_policy(threads, malloc=malloc)
    torch.set_num_threads(threads)  # under the policy's off switch too: the figures are for `threads` threads
    result: dict[tuple[str, str, int], float] = {}
    spins = set() if spins is None else spins
    stems = [p.cfg.stem for p in prepared]
    for s in sizes:
        # detect.py hands the backend a channels_last view of the letterboxed image (detect.to_tensor)
        x = torch.rand(1, s, s, 3).permute(0, 3, 1, 2)
        fns: dict[str, Callable[[], object]] = {}
        for p in prepared:
            files = {"pt": p.pt, "ptc": p.pt if compile else None, "onnx": p.onnx.get(s)}
            for fmt, f in files.items():
                if f is not None:
                    spin_f = (spin if spin is not None else spin_ok(threads)) if fmt == "onnx" else True
                    b = DetectBackend(f, threads=threads, spin=spin_f, compile=fmt == "ptc")
                    if fmt == "onnx":
                        spins.add(bool(b.spin))
                    if fmt == "ptc":
                        b(x)  # compiles here, outside the timed rounds
                        if compile_s is not None:
                            compile_s[(p.cfg.stem, s)] = b.compile_s
                        if not b.compiled:
                            continue
                    fns[f"{p.cfg.stem}|{fmt}"] = (lambda b=b: b(x))
        fns = dict(sorted(fns.items(), key=lambda kv: _block_order(kv[0], adjacent, stems)))
        for k, times in interleaved_rounds(fns, runs, warmup, desc=f"latency {s}").items():
            stem, fmt = k.split("|")
            result[(stem, fmt, s)] = statistics.median(t for r in times for t in r)
            if rounds is not None:
                rounds[(stem, fmt, s)] = times
    return result
