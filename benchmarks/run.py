"""Every figure of every detector YAML in models/, in one markdown report (README's model table, docs/PERFORMANCE.md).

    python benchmarks/run.py                                  # all detectors, 320 and 640, 30 runs
    python benchmarks/run.py --runs 5 --cfg models/yolov5n.yaml models/mobilenetv3-small-yolo.yaml \\
        --imgsz 320 --skip-train --out bench.md

Per model: parameters, GFLOPs per size, batch-1 latency (median of `--runs` after warm-up) in PyTorch
(detect.py's path: `.pt` through `DetectBackend`, fused, channels_last, decode included; printed without a
target: the fast paths we document are ONNX Runtime and --compile), in PyTorch
compiled (`detect.py --compile`: torch.compile of model + decode, compiled before timing) and in ONNX
Runtime (`--threads` intra-op threads, static export, decode in the graph), training images/s at 320
batch 16 with peak memory (benchmarks/train_speed.py, one subprocess per model) and, for the training
target, mobilenetv3-small-yolo's and yolov5n's steps taken in turn in one process. Then detect.py's
per-image path stage by stage on the bundled BCCD val images (benchmarks/detect_path.py), the machine,
and the issue's targets as ratios measured within this one run, each marked met or missed.

Latency timings interleave all (model, format) pairs in rounds (format by format, mobilenetv3-small-yolo's
and yolov5n's blocks back to back; per round each gets 3 untimed re-warm calls, then 5 timed ones) so
load changes hit them alike: on a shared machine absolute milliseconds drift, the ratios much less. The
target ratios pair the two models round by round and give the spread over rounds. The process applies the
runtime policy detect.py's `main()` applies (`utils.infer.runtime.apply_policy`: torch on `--threads`
threads, glibc allocator settings `MALLOC_SETTINGS`), exports the allocator settings to the training
subprocesses and decides ONNX Runtime spin-waiting with `runtime.spin_ok`, as detect.py does;
`--no-malloc-tune` measures glibc's defaults instead. When the machine is busy at start
(fewer idle cores than `--threads`; `--omp` to force either way; an OMP_WAIT_POLICY in the environment
wins) it sets OMP_WAIT_POLICY=PASSIVE before torch loads, so torch's OpenMP threads sleep instead of
spinning while they wait for each other. With libgomp's default, batch-1 passes on a 2-core machine that
other processes also used took tens of times longer, which made the PyTorch column meaningless and the
run hours long; on an idle machine spinning is faster (docs/PERFORMANCE.md).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # script run: import from the repo root

ROOT = Path(__file__).resolve().parents[1]
SMALL, NANO = "mobilenetv3-small-yolo", "yolov5n"
# (what, figure key, size, 'max' or 'min', bound): mobilenetv3-small-yolo's figure over yolov5n's, as the issue states them.
# Eager PyTorch ("pt") has no target any more (issue 18): the table still prints its figures.
TARGETS = (
    ("ONNX Runtime latency at 320, mobilenetv3-small-yolo / yolov5n", "onnx", 320, "max", 0.5),
    ("PyTorch latency at 320 with detect.py --compile, mobilenetv3-small-yolo / yolov5n", "ptc", 320, "max", 0.6),
    ("training images/s, mobilenetv3-small-yolo / yolov5n", "train", 320, "min", 2.0),
)


@dataclass
class Report:
    """Everything one run measured; `markdown()` renders it."""

    machine: dict[str, str]
    sizes: list[int]
    runs: int
    threads: int
    rows: list[dict] = field(default_factory=list)  # per model: cfg, params, gflops{s}, pt{s}, ptc{s}, onnx{s},
    # compile_s{s}, train
    rounds: dict = field(default_factory=dict)  # (cfg stem, format, size) -> per-round latency ms
    train_pair: dict | None = None  # train_speed.paired() of mobilenetv3-small-yolo and yolov5n
    detect: list = field(default_factory=list)  # detect_path.PathResult per format
    seconds: float = 0.0
    command: str = "python benchmarks/run.py"


def detector_yamls(folder: Path = ROOT / "models") -> list[Path]:
    """Every YAML in `folder` whose head ends in a Detect row (classifier YAMLs are skipped)."""
    import yaml

    out = []
    for p in sorted(folder.glob("*.yaml")):
        d = yaml.safe_load(p.read_text(encoding="utf-8"))
        rows = (d.get("head") or []) if isinstance(d, dict) else []
        if rows and isinstance(rows[-1], list) and len(rows[-1]) > 2 and str(rows[-1][2]) == "Detect":
            out.append(p)
    return out


def train_figures(cfgs: list[Path], threads: int, steps: int, rounds: int = 2) -> dict[str, dict]:
    """{cfg stem: train_speed row} at 320 batch 16 (benchmarks/train_speed.py, subprocess per model,
    `rounds` rounds over all models, step times pooled)."""
    from benchmarks import train_speed

    with contextlib.redirect_stdout(io.StringIO()):  # it prints its own table; ours carries the figures
        rows = train_speed.run([str(c) for c in cfgs], imgsz=320, batch=16, steps=steps, warmup=2, threads=threads,
                               rounds=rounds)
    return {Path(r["cfg"]).stem: r for r in rows}


def train_pair(cfgs: list[Path], threads: int, steps: int) -> dict | None:
    """train_speed.paired(mobilenetv3-small-yolo, yolov5n) in a fresh subprocess, or None when either
    model is not among `cfgs` (or the subprocess fails, with a warning)."""
    import json
    import subprocess

    by = {c.stem: c for c in cfgs}
    if SMALL not in by or NANO not in by:
        return None
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_speed.py"), "--paired", str(by[SMALL]), str(by[NANO]),
           "--steps", str(steps), "--threads", str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        print(f"warning: paired training steps failed:\n{res.stderr[-1500:]}", file=sys.stderr)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


def ratio(rows: list[dict], key: str, size: int) -> float | None:
    """mobilenetv3-small-yolo's figure over yolov5n's, or None when either is missing."""
    by = {r["cfg"]: r for r in rows}
    if SMALL not in by or NANO not in by:
        return None
    if key == "train":
        a, b = (by[m].get("train") or {} for m in (SMALL, NANO))
        return a["img_s"] / b["img_s"] if a and b else None
    a, b = by[SMALL].get(key, {}).get(size), by[NANO].get(key, {}).get(size)
    return a / b if a and b else None


def target_lines(rep: Report) -> list[str]:
    """One line per target: measured ratio, bound, met/missed (or not measured).

    Latency ratios are the median over rounds of the per-round ratio (`latency.paired_ratio`), with
    their interquartile range; the training ratio likewise, over the paired steps of `train_speed.paired`
    (else, when that did not run, the ratio of the table's pooled medians).
    """
    from benchmarks.latency import paired_ratio

    lines = []
    for name, key, size, kind, bound in TARGETS:
        r, spread = ratio(rep.rows, key, size), ""
        a, b = rep.rounds.get((SMALL, key, size)), rep.rounds.get((NANO, key, size))
        if a and b:
            r, lo, hi = paired_ratio(a, b)
            spread = f", rounds' IQR {lo:.2f}-{hi:.2f} over {len(a)} rounds"
        if key == "train" and rep.train_pair:
            r, (lo, hi) = rep.train_pair["ratio"], rep.train_pair["iqr"]
            spread = f", IQR {lo:.2f}-{hi:.2f} over {rep.train_pair['pairs']} steps of each taken in turn"
        if r is None:
            lines.append(f"- {name}: not measured in this run")
            continue
        met = r <= bound if kind == "max" else r >= bound
        lines.append(f"- {name}: **{r:.2f}x** (target {'<=' if kind == 'max' else '>='} {bound}x{spread}): "
                     f"{'met' if met else 'MISSED'}")
    from benchmarks.detect_path import CHECKED

    for d in rep.detect:
        worst = max(CHECKED, key=lambda s: d.ms[s])
        met = d.ms[worst] <= d.ms["model"]
        lines.append(f"- detect.py path ({d.fmt}): costliest non-model stage `{worst}` {d.ms[worst]:.2f} ms vs "
                     f"model {d.ms['model']:.2f} ms: {'met' if met else 'MISSED'}")
    return lines


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _max(values) -> float | None:
    got = [v for v in values if v is not None]
    return max(got) if got else None


def table(rep: Report) -> str:
    """The per-model markdown table."""
    s = rep.sizes
    comp = any(v is not None for r in rep.rows for v in r.get("ptc", {}).values())
    head = (["model", "params (M)"] + [f"GFLOPs {x}" for x in s] + [f"PyTorch {x} (ms)" for x in s]
            + ([f"PyTorch --compile {x} (ms)" for x in s] + ["compile (s)"] if comp else [])
            + [f"ORT {x} (ms)" for x in s] + ["train img/s (320, b16)", "train peak RSS (MiB)"])
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rep.rows:
        t = r.get("train") or {}
        cells = ([r["cfg"], f"{r['params'] / 1e6:.2f}"] + [f"{r['gflops'][x]:.2f}" for x in s]
                 + [_fmt(r["pt"].get(x), ".1f") for x in s]
                 + ([_fmt(r["ptc"].get(x), ".1f") for x in s] + [_fmt(_max(r["compile_s"].values()), ".0f")]
                    if comp else [])
                 + [_fmt(r["onnx"].get(x), ".1f") for x in s]
                 + [_fmt(t.get("img_s"), ".1f"), _fmt(t.get("peak_rss_mb"), ".0f")])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(rep: Report) -> str:
    """The whole report: machine, model table, detect path, targets, command."""
    from benchmarks.detect_path import markdown as detect_md
    from benchmarks.machine import markdown as machine_md

    parts = ["## Benchmarks", "", f"Batch-1 latency: median of {rep.runs} runs after 5 warm-up runs, "
             f"{rep.threads} threads (PyTorch and ONNX Runtime), models and formats timed in interleaved "
             f"rounds (per round and model: 3 untimed calls to re-warm, then 5 timed). "
             f"PyTorch = detect.py's `.pt` path (fused, channels_last, decode included; no target); "
             f"PyTorch --compile = the same with `detect.py --compile` (torch.compile, weights frozen, C++ wrapper; compile = the "
             f"longest of its first-call compiles, on-disk cache as found); ORT = static ONNX "
             f"export with decode in the graph. Training: forward + loss + backward + SGD step on random "
             f"data, 320 px, batch 16, no data loading, median step of all rounds (every model measured "
             f"once per round, in turn); peak RSS of the training process. The training target's ratio "
             f"comes from steps of the two models taken in turn in one process "
             f"(`benchmarks/train_speed.py --paired`).", "",
             table(rep), ""]
    for d in rep.detect:
        parts += [detect_md(d), ""]
    parts += ["Targets (ratios within this run):", "", *target_lines(rep), "",
              "Machine:", "", machine_md(rep.machine), "",
              f"Command: `{rep.command}` ({rep.seconds / 60:.1f} min)"]
    return "\n".join(parts) + "\n"


def run(cfgs: list[str | Path] | None = None, sizes: tuple[int, ...] | list[int] = (320, 640), runs: int = 30,
        threads: int = 2, skip_train: bool = False, train_steps: int = 5, detect_cfg: str | Path | None = None,
        detect_weights: str | Path | None = None, malloc_tune: bool = True, out: str | Path | None = None,
        detect_source: str | Path | None = None, command: str | None = None, ort_spin: bool | None = None,
        train_rounds: int = 2, compile: bool = True, train_pairs: int = 12) -> Report:
    """Measure, print and (with `out`) write the report; returns it. See the module docstring."""
    import torch

    from benchmarks import detect_path, latency
    from benchmarks.machine import describe
    from utils.infer.backend import PT_SUFFIXES
    from utils.infer.runtime import MALLOC_SETTINGS, apply_policy

    t0 = time.time()
    if not malloc_tune:  # nothing in this process or its subprocesses (a script's main()) may apply them then
        os.environ["MOBILEYOLO_MALLOC_TUNE"] = "0"
    # what detect.py's main() does before its first frame; before the environment below, which tune_malloc
    # would take as the user's own settings (glibc reads them only at start-up) and leave this process untuned
    apply_policy(threads, malloc=malloc_tune)
    torch.set_num_threads(threads)  # under the policy's off switch too: the figures are for `threads` threads
    if malloc_tune:
        for k, v in MALLOC_SETTINGS.items():  # the training subprocesses inherit these
            os.environ.setdefault(k, str(v))
    cfgs = [Path(c) for c in (cfgs or detector_yamls())]
    sizes = sorted({int(s) for s in sizes})
    rep = Report(describe(), sizes, runs, threads)
    load_start = rep.machine["load"]
    with tempfile.TemporaryDirectory() as d:
        prepared = latency.prepare(cfgs, sizes, Path(d), threads=threads)
        spins: set[bool] = set()
        compile_s: dict = {}
        ms = latency.time_all(prepared, sizes, runs, threads, malloc=malloc_tune, spin=ort_spin, spins=spins,
                              rounds=rep.rounds, compile=compile, compile_s=compile_s, adjacent=(SMALL, NANO))
    for p in prepared:
        stem = p.cfg.stem
        rep.rows.append({"cfg": stem, "params": p.params, "gflops": p.gflops,
                         "pt": {s: ms.get((stem, "pt", s)) for s in sizes},
                         "ptc": {s: ms.get((stem, "ptc", s)) for s in sizes},
                         "compile_s": {s: compile_s.get((stem, s)) for s in sizes},
                         "onnx": {s: ms.get((stem, "onnx", s)) for s in sizes}})
    if not skip_train:
        try:
            train = train_figures(cfgs, threads, train_steps, train_rounds)
        except Exception as e:  # another part's script: report and keep the other figures
            print(f"warning: training figures failed ({type(e).__name__}: {e}); column left empty", file=sys.stderr)
            train = {}
        for r in rep.rows:
            r["train"] = train.get(r["cfg"])
        if train_pairs > 0:
            rep.train_pair = train_pair(cfgs, threads, train_pairs)
    dcfg = Path(detect_cfg) if detect_cfg else next((c for c in cfgs if c.stem == SMALL), cfgs[0])
    # at the default size: a 64 px row (asked for to see fixed costs) would make every stage dwarf the model
    dsize = 320 if 320 in sizes else min(sizes)
    for fmt in ("pt", "ptc", "onnx") if compile else ("pt", "onnx"):
        rep.detect.append(detect_path.run(detect_weights, dcfg, detect_source, dsize, threads, fmt=fmt))
        if detect_weights and Path(detect_weights).suffix not in PT_SUFFIXES:  # an export has one format
            break
    rep.machine = describe()
    rep.machine["load"] = f"at start {load_start}; at end {rep.machine['load']}"  # it moves during a run
    used = "/".join("on" if x else "off" for x in sorted(spins)) or "n/a"
    rep.machine["ORT spin-wait (latency table)"] = f"{used} ({ {None: 'auto: off when busy, stopped after each run', True: 'forced on, stopped after each run', False: 'forced off'}[ort_spin]})"
    rep.command = command or f"benchmarks.run.run(cfgs={[str(c) for c in cfgs]}, sizes={sizes}, runs={runs})"
    rep.seconds = time.time() - t0
    text = markdown(rep)
    print(text)
    if out:
        Path(out).write_text(text, encoding="utf-8")
        print(f"written to {out}")
    return rep


def set_omp_policy(mode: str, threads: int) -> None:
    """Set OMP_WAIT_POLICY for torch's OpenMP pool before torch loads (libgomp reads it only then).

    'auto': PASSIVE when fewer CPUs are idle than `threads` (sampled for half a second from /proc/stat,
    else from the 1-minute load average), else libgomp's default; an OMP_WAIT_POLICY already in the
    environment always wins.
    """
    from utils.infer.runtime import estimate_idle

    if mode == "active" or "OMP_WAIT_POLICY" in os.environ:
        return
    if mode == "auto":
        idle = estimate_idle(0.5)
        if idle is None or idle + 0.5 >= threads:
            return
    if "torch" in sys.modules:
        print("warning: OMP_WAIT_POLICY=PASSIVE has no effect, torch is already imported", file=sys.stderr)
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", nargs="+", default=None, help="model YAMLs (default: every detector in models/)")
    p.add_argument("--imgsz", nargs="+", type=int, default=[320, 640], help="latency/GFLOPs sizes (px)")
    p.add_argument("--runs", type=int, default=30, help="timed runs per latency figure (after 5 warm-up)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads, PyTorch and ONNX Runtime")
    p.add_argument("--skip-train", action="store_true", help="no training column")
    p.add_argument("--train-steps", type=int, default=5, help="timed training steps per model and round")
    p.add_argument("--train-rounds", type=int, default=2, help="rounds over all models for the training column")
    p.add_argument("--train-pairs", type=int, default=12,
                   help="paired steps (one process, models in turn) for the training target's ratio; 0 = none")
    p.add_argument("--detect-cfg", default=None, help="YAML for the detect path (default mobilenetv3-small-yolo)")
    p.add_argument("--detect-weights", default=None, help="trained weights for the detect path (default random)")
    p.add_argument("--no-malloc-tune", action="store_true", help="measure with glibc's default allocator settings")
    p.add_argument("--omp", choices=("auto", "active", "passive"), default="auto",
                   help="OMP_WAIT_POLICY for torch (auto: PASSIVE when the machine is busy at start, see above)")
    p.add_argument("--ort-spin", choices=("auto", "on", "off"), default="auto",
                   help="ONNX Runtime spin-waiting in the latency table (auto: off on a busy machine, as detect.py)")
    p.add_argument("--no-compile", action="store_true", help="no PyTorch --compile column (saves 10-30 s per model and size)")
    p.add_argument("--out", default=None, help="also write the markdown report to this file")
    a = p.parse_args(argv)
    if a.runs < 1 or a.threads < 1 or any(s < 32 or s % 32 for s in a.imgsz):
        p.error("--runs and --threads must be >= 1; --imgsz values multiples of 32")
    set_omp_policy(a.omp, a.threads)
    cmd = "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    run(a.cfg, a.imgsz, a.runs, a.threads, a.skip_train, a.train_steps, a.detect_cfg, a.detect_weights,
        not a.no_malloc_tune, a.out, command=cmd.strip(), ort_spin={"auto": None, "on": True, "off": False}[a.ort_spin],
        train_rounds=a.train_rounds, compile=not a.no_compile, train_pairs=a.train_pairs)


if __name__ == "__main__":
    main()
