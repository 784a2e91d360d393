"""Our CPU inference kernels (utils/native_infer.py) against PyTorch's path: per op, and per model.

    python benchmarks/infer_kernels.py                     # MobileNetV3-Small-YOLO's ops, then Small vs yolov5n
    python benchmarks/infer_kernels.py --imgsz 640 --runs 100 --threads 2
    python benchmarks/infer_kernels.py --batch 8 --no-model   # the kernels at batch 8 (DetectBackend uses them at 1)

Per op, batch 1 (or `--batch`, timed even beyond `utils.native_infer.MAX_BATCH`, where DetectBackend
does not use them), BN folded, channels_last: every depthwise conv of the first `--cfg` as detect.py
ran it before (oneDNN conv with its activation as a post-op on packed weights, utils/packed_conv.py)
against `DepthwiseConvAct`, and every squeeze-excite (`SELayer`'s six ATen ops) against
`SqueezeExciteNative`; median us of `--runs` calls. Then each `--cfg` through `DetectBackend` (the whole
detect.py model call: fused, packed, decode) with and without our kernels, all four timed in
interleaved rounds (benchmarks/latency.py), with the first two models' latency ratio per arm.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # script run: import from the repo root

CL = torch.channels_last


def _us(fn, runs: int) -> float:  # noqa: ANN001
    from benchmarks.train_profile import _median_ms

    return _median_ms(fn, runs, warmup=max(5, runs // 10)) * 1e3


@torch.inference_mode()
def op_rows(cfg: str, imgsz: int, runs: int, batch: int = 1) -> list[tuple[str, str, float, float]]:
    """(op, input shape, PyTorch path us, ours us) for each depthwise conv and SE of `cfg` at `batch`."""
    from models.common import ConvBNAct
    from models.mobilenetv3 import SELayer
    from models.yolo import Model
    from utils import native_infer
    from utils.native_infer import eligible_depthwise

    model = Model(cfg, nc=80).fuse().eval().to(memory_format=CL)
    seen: list[tuple[torch.nn.Module, torch.Tensor]] = []
    hooks = [m.register_forward_pre_hook(lambda mod, i: seen.append((mod, i[0].clone(memory_format=CL))))
             for m in model.modules()
             if isinstance(m, SELayer) or (isinstance(m, ConvBNAct) and eligible_depthwise(m.conv, m.act))]
    model(torch.rand(batch, 3, imgsz, imgsz).contiguous(memory_format=CL))
    for h in hooks:
        h.remove()
    limits = native_infer.MAX_BATCH, native_infer.MAX_VALUES
    native_infer.MAX_BATCH, native_infer.MAX_VALUES = batch, max(x.numel() for _, x in seen)  # time ours anyway
    try:
        return _time_ops(seen, runs)
    finally:
        native_infer.MAX_BATCH, native_infer.MAX_VALUES = limits


def _time_ops(seen: list, runs: int) -> list[tuple[str, str, float, float]]:
    from models.mobilenetv3 import SELayer
    from utils.native_infer import DepthwiseConvAct, SqueezeExciteNative
    from utils.packed_conv import POST_OPS, PackedConvAct

    rows = []
    for mod, x in seen:
        if isinstance(mod, SELayer):
            ours = SqueezeExciteNative(mod)
            rows.append(("squeeze-excite", str(list(x.shape)), _us(lambda: mod(x), runs), _us(lambda: ours(x), runs)))
        else:
            packed = PackedConvAct(mod.conv, POST_OPS[type(mod.act)], list(x.shape))
            ours = DepthwiseConvAct(mod.conv, mod.act)
            name = f"depthwise {mod.conv.kernel_size[0]}x{mod.conv.kernel_size[0]} s{mod.conv.stride[0]}"
            rows.append((name, str(list(x.shape)), _us(lambda: packed(x), runs), _us(lambda: ours(x), runs)))
    return rows


def model_ab(cfgs: list[str], imgsz: int, runs: int, threads: int) -> dict[str, float]:
    """Median ms per '<stem>|on' / '<stem>|off' (DetectBackend with / without our kernels), plus the
    per-round ratio of the first two cfgs in each arm under '<a>/<b>|on' and '<a>/<b>|off'."""
    from benchmarks.latency import checkpoint_for, interleaved_rounds, paired_ratio
    from utils.backend import DetectBackend

    x = torch.rand(1, imgsz, imgsz, 3).permute(0, 3, 1, 2)  # as detect.to_tensor hands it over
    fns = {}
    with tempfile.TemporaryDirectory() as tmp:
        for cfg in cfgs:
            pt, _ = checkpoint_for(cfg, Path(tmp))
            for arm in ("on", "off"):
                b = DetectBackend(pt, threads=threads, native=arm == "on")
                b(x)
                if arm == "on":
                    print(f"{Path(cfg).stem}: {b.native} layers on our kernels, "
                          f"{b.packed} convs packed (oneDNN) or as matrix products")
                fns[f"{Path(cfg).stem}|{arm}"] = lambda b=b: b(x)
        rounds = interleaved_rounds(fns, runs, desc=f"models {imgsz}")
    out = {k: statistics.median(t for r in v for t in r) for k, v in rounds.items()}
    if len(cfgs) > 1:
        a, b = Path(cfgs[0]).stem, Path(cfgs[1]).stem
        for arm in ("on", "off"):
            out[f"{a}/{b}|{arm}"] = paired_ratio(rounds[f"{a}|{arm}"], rounds[f"{b}|{arm}"])[0]
    return out


def run(cfgs: list[str], imgsz: int = 320, runs: int = 60, threads: int = 2, ops: bool = True, batch: int = 1,
        models: bool = True) -> dict:
    """Print the per-op table and the model A/B; return {"ops": rows, "models": model_ab(...)}."""
    from utils import native

    torch.set_num_threads(threads)
    if native.load("infer") is None:
        raise SystemExit(f"the inference kernels library is unavailable: {native.unavailable_reason('infer')}")
    out: dict = {"ops": []}
    if ops:
        out["ops"] = op_rows(cfgs[0], imgsz, runs, batch)
        print(f"\n{Path(cfgs[0]).name}, {imgsz} px, batch {batch}, {threads} threads, median us:\n")
        print("| op | input | PyTorch | ours | ours / PyTorch |\n|---|---|---:|---:|---:|")
        for op, shape, t, o in out["ops"]:
            print(f"| {op} | {shape} | {t:.0f} | {o:.0f} | {o / t:.2f} |")
        tot_t, tot_o = sum(r[2] for r in out["ops"]), sum(r[3] for r in out["ops"])
        print(f"| all {len(out['ops'])} | | {tot_t:.0f} | {tot_o:.0f} | {tot_o / tot_t:.2f} |")
    if not models:
        return out
    m = out["models"] = model_ab(cfgs, imgsz, runs, threads)
    print(f"\nDetectBackend (.pt, detect.py's path), {imgsz} px, {threads} threads, median ms over {runs} runs:\n")
    print("| model | with our kernels | without | ratio |\n|---|---:|---:|---:|")
    for cfg in cfgs:
        s = Path(cfg).stem
        print(f"| {s} | {m[s + '|on']:.2f} | {m[s + '|off']:.2f} | {m[s + '|on'] / m[s + '|off']:.2f} |")
    for k in m:
        if "/" in k and k.endswith("|on"):
            pair = k[:-3]
            print(f"\n{pair} latency ratio (median over rounds): {m[k]:.3f} with our kernels, "
                  f"{m[pair + '|off']:.3f} without")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", nargs="+", default=["models/mobilenetv3-small-yolo.yaml", "models/yolov5n.yaml"])
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--runs", type=int, default=60, help="timed calls per op and per model arm")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=1, help="batch of the per-op table")
    p.add_argument("--no-ops", action="store_true", help="only the model A/B")
    p.add_argument("--no-model", action="store_true", help="only the per-op table")
    a = p.parse_args(argv)
    if a.batch < 1 or a.runs < 1 or a.threads < 1:
        p.error("--batch, --runs and --threads must be >= 1")
    run(a.cfg, a.imgsz, a.runs, a.threads, not a.no_ops, a.batch, not a.no_model)


if __name__ == "__main__":
    main()
