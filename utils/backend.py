"""One inference front for every model format: our `.pt` checkpoints, `.torchscript` and `.onnx` exports.

`DetectBackend(weights)` loads the file by suffix and recovers the class names, the largest stride and
the image size from the file itself (checkpoint keys, TorchScript `config.json` extra file, ONNX
`metadata_props`). Calling it on a float `[B, 3, H, W]` batch in 0..1 returns the decoded
`[B, N, 5 + nc]` tensor (columns cx, cy, w, h in network-input pixels, obj, class probabilities; see
`utils.decode.decode`), whatever the format, so detect.py and val.py never branch on it.

Safety: checkpoints are read with `torch.load(weights_only=True)` (via `utils.checkpoint`), so a
pickle that would run code is refused. TorchScript archives are read by TorchScript's own restricted
loader. Every unusable file raises `BackendError` naming it.
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.cpu import idle_cores, physical_cores  # noqa: F401 - physical_cores is re-exported

PT_SUFFIXES = (".pt", ".pth")
TS_SUFFIXES = (".torchscript", ".ts")
ONNX_SUFFIXES = (".onnx",)
METADATA_FILE = "config.json"  # TorchScript extra file holding the same keys as the ONNX metadata


class BackendError(ValueError):
    """A weights file that is missing, of an unknown type, or not a MobileYOLO model."""


def _torch_threads(asked: int | None) -> None:
    """Set torch's intra-op threads: `asked`, or when None never more than `idle_cores()`.

    Why: torch's OpenMP threads spin while they wait for each other. When other processes occupy the
    cores, a batch-1 forward pass on 2 threads ran 50-80x slower than on 1 (1.1 s vs 13 ms for
    MobileNetV3-Small at 320 on a 2-core machine at load 4, benchmarks/run.py); fewer threads avoid it.
    Only lowers the caller's setting, so a deliberate `torch.set_num_threads` elsewhere still holds.
    """
    if asked:
        torch.set_num_threads(asked)
    else:
        torch.set_num_threads(max(1, min(torch.get_num_threads(), idle_cores())))


# glibc allocator settings for inference. By default glibc serves blocks above 128 KiB-32 MiB (an adaptive
# threshold) with fresh mmap()s and returns freed heap tops to the OS, so every forward pass re-faults
# and re-zeroes its activation buffers; keeping them in the heap made MobileNetV3-Small ~1/3 faster here
# (benchmarks/run.py). 32 MiB is the largest mmap threshold glibc accepts on 64-bit.
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


def export_metadata(names: list[str], strides: list[float], imgsz: tuple[int, int], batch: int,
                    dynamic: bool) -> dict[str, str]:
    """The metadata written into exports (all values JSON strings, as ONNX metadata_props require).

    Keys: `names` (list), `nc`, `stride` (largest, int), `strides` (per level), `imgsz` ([h, w] the
    file was exported at), `batch`, `dynamic`, `format` ('mobileyolo-detect-v1').
    """
    meta = {"names": list(names), "nc": len(names), "stride": int(max(strides)), "strides": [float(s) for s in strides],
            "imgsz": [int(imgsz[0]), int(imgsz[1])], "batch": int(batch), "dynamic": bool(dynamic),
            "format": "mobileyolo-detect-v1"}
    return {k: json.dumps(v) for k, v in meta.items()}


def _parse_metadata(meta: dict[str, Any], file: Path) -> dict[str, Any]:
    out = {}
    for k, v in meta.items():
        try:
            out[k] = json.loads(v) if isinstance(v, (str, bytes)) else v
        except json.JSONDecodeError:
            out[k] = v
    if out.get("format") != "mobileyolo-detect-v1" or not isinstance(out.get("names"), list):
        raise BackendError(f"{file}: no MobileYOLO metadata (names/stride/imgsz) in this file; export it "
                           f"with `python export.py --weights best.pt`")
    return out


class DetectBackend:
    """Load `weights` (.pt/.pth checkpoint, .torchscript, .onnx) for CPU inference.

    Attributes: `fmt` ('pt', 'torchscript', 'onnx'), `names: list[str]`, `nc`, `stride: int` (largest),
    `imgsz: tuple[int, int]` (h, w: the export size, or the training size for checkpoints),
    `dynamic: bool` (any input size multiple of `stride` works; False for fixed-shape exports, which
    need exactly `imgsz`), `batch: int | None` (fixed batch of a static export, else None).
    `threads` sets ONNX Runtime's intra-op threads (default: physical cores) and torch's (default: at
    most `idle_cores()`, see `_torch_threads`). `spin`: whether ONNX Runtime's threads spin-wait
    between ops (None: only while `idle_cores()` covers its threads, i.e. not on a busy machine; they
    stop spinning when each run ends). `session_config`: the ONNX Runtime config entries that applies.
    `malloc`: apply `tune_malloc()` (process-wide glibc allocator settings that speed up inference).
    `pack` (.pt with `fuse`): on the first CPU call, swap the convs for oneDNN conv+activation calls
    with weights packed for that call's input shape (`utils.packed_conv`; other shapes still work,
    at some cost); `packed` then says how many were swapped. Before that, depthwise convs and
    squeeze-excites are swapped for our C kernels (`utils.native_infer`, any shape; `native=False`
    skips that); `native` then says how many. Pass `pack=False` to move `model` to a GPU.
    `compile` (.pt with `fuse`, CPU): instead of packing, torch.compile model + decode on the first
    call for that call's shape and memory layout (`utils.compiled`; 4-21 s once, then 1.1-1.5x
    faster); inputs of another shape run eager. `compiled` then says whether it is in use and
    `compile_s` how long it took. `fixed_input`: whether callers should letterbox every frame to one
    shape (a fixed-size export's `imgsz`; once compiled, the compiled shape, as others run eager).
    """

    def __init__(self, weights: str | Path, threads: int | None = None, fuse: bool = True,
                 malloc: bool = True, spin: bool | None = None, pack: bool = True,
                 compile: bool = False, native: bool = True) -> None:
        self.spin = spin
        self._swap_native = native
        self._compiled, self._compile = None, False  # utils.compiled.CompiledDecoder once built
        if malloc:
            tune_malloc()
        self.file = Path(weights)
        if not self.file.is_file():
            raise BackendError(f"{self.file}: weights file not found")
        if threads is not None and int(threads) < 1:
            raise BackendError(f"threads must be >= 1, got {threads}")
        self.threads = int(threads) if threads else None
        suffix = self.file.suffix.lower()
        self.batch: int | None = None
        self.dynamic = True
        if suffix in PT_SUFFIXES:
            self._load_pt(fuse, pack)
            self._compile = fuse and compile
        elif suffix in TS_SUFFIXES:
            self._load_torchscript()
        elif suffix in ONNX_SUFFIXES:
            self._load_onnx()
        else:
            raise BackendError(f"{self.file}: unknown weights type '{suffix}'; expected one of "
                               f"{', '.join(PT_SUFFIXES + TS_SUFFIXES + ONNX_SUFFIXES)}")
        self.nc = len(self.names)

    # ---- loaders -------------------------------------------------------------------------------
    def _load_pt(self, fuse: bool, pack: bool) -> None:
        from utils.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
        from utils.decode import Decoder

        try:
            ckpt = load_checkpoint(self.file)
            model = model_from_checkpoint(ckpt)
        except CheckpointError as e:
            raise BackendError(str(e)) from None
        except (KeyError, TypeError, ValueError) as e:  # a dict that looks like a checkpoint but is not one
            raise BackendError(f"{self.file}: not a MobileYOLO checkpoint ({type(e).__name__}: {e})") from None
        if getattr(model, "detect", None) is None:
            raise BackendError(f"{self.file}: a classification checkpoint; detect/val need a detection model")
        if fuse:
            model.fuse()
        model = model.eval().to(memory_format=torch.channels_last)
        for p in model.parameters():
            p.requires_grad_(False)
        _torch_threads(self.threads)
        self.fmt, self.model = "pt", Decoder(model).eval()
        self.names = [str(n) for n in ckpt["names"]]
        self.strides = [float(s) for s in model.detect.stride.tolist()]
        self.stride = int(max(self.strides))
        args = ckpt.get("args") or {}
        size = args.get("imgsz", 320) if isinstance(args, dict) else 320
        self.imgsz = _as_hw(size)
        self.packed = 0  # convs run as one oneDNN conv+activation call or one addmm (utils/packed_conv.py)
        self.native = 0  # depthwise convs and squeeze-excites running our C kernels (utils/native_infer.py)
        self._pack_on_first_call = fuse and pack  # packed for the first input's shape (warmup's, in detect.py)

    def _load_torchscript(self) -> None:
        extra = {METADATA_FILE: ""}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated but still our TS path
                self.model = torch.jit.load(str(self.file), map_location="cpu", _extra_files=extra).eval()
        except Exception as e:  # RuntimeError/ValueError for anything that is not a TorchScript archive
            raise BackendError(f"{self.file}: not a TorchScript model ({_first_line(e)})") from None
        raw = extra[METADATA_FILE]
        try:
            meta = json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            meta = {}
        if not isinstance(meta, dict):
            meta = {}
        self._apply_metadata(_parse_metadata(meta, self.file))
        _torch_threads(self.threads)
        self.fmt = "torchscript"

    def _load_onnx(self) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = self.threads or physical_cores()
        spin = self.spin if self.spin is not None else idle_cores() >= opts.intra_op_num_threads
        self.spin = spin  # the decision, for reports
        # Spinning threads answer the next op sooner, but on a busy machine they steal the cores others
        # need; and left spinning after a run they steal them from our own NMS and drawing: with spinning
        # on but not stopped, NMS took 3.4-5.1 ms instead of 0.9 ms per BCCD image (benchmarks/detect_path.py),
        # while spin-waiting inside a run cut MobileNetV3-Small's model time from 4.9 to 3.5 ms.
        self.session_config = ({"session.force_spinning_stop": "1"} if spin
                               else {"session.intra_op.allow_spinning": "0"})
        for key, value in self.session_config.items():
            opts.add_session_config_entry(key, value)
        opts.log_severity_level = 3  # errors only; ORT's warnings about initializers are noise here
        try:
            self.session = ort.InferenceSession(str(self.file), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for invalid protobufs
            raise BackendError(f"{self.file}: not a valid ONNX model ({_first_line(e)})") from None
        self._apply_metadata(_parse_metadata(self.session.get_modelmeta().custom_metadata_map, self.file))
        inp, outs = self.session.get_inputs(), self.session.get_outputs()
        if len(inp) != 1 or len(outs) != 1 or len(inp[0].shape) != 4 or len(outs[0].shape) != 3:
            raise BackendError(f"{self.file}: expected one [b,3,h,w] input and one [b,N,5+nc] output")
        self.input_name, self.output_name = inp[0].name, outs[0].name
        b, _, h, w = inp[0].shape
        self.dynamic = not all(isinstance(d, int) for d in (h, w))
        self.batch = b if isinstance(b, int) else None
        self.fmt = "onnx"

    def _apply_metadata(self, meta: dict[str, Any]) -> None:
        self.names = [str(n) for n in meta["names"]]
        self.strides = [float(s) for s in meta.get("strides", [meta.get("stride", 32)])]
        self.stride = int(meta.get("stride", max(self.strides)))
        self.imgsz = _as_hw(meta.get("imgsz", 320))
        self.dynamic = bool(meta.get("dynamic", False))
        self.batch = None if self.dynamic else int(meta.get("batch", 1))

    # ---- inference -----------------------------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> None:
        """Raise `BackendError` when `x` does not fit this model (rank, channels, size, stride)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise BackendError(f"{self.file.name}: input must be a float [B, 3, H, W] tensor, got {shape}")
        h, w = x.shape[2:]
        if not self.dynamic and (h, w) != tuple(self.imgsz):
            raise BackendError(f"{self.file.name}: fixed-size export takes {self.imgsz[0]}x{self.imgsz[1]} "
                               f"inputs, got {h}x{w}; re-export with --dynamic or use --imgsz {self.imgsz[0]}")
        if h % self.stride or w % self.stride:
            raise BackendError(f"{self.file.name}: input {h}x{w} is not a multiple of the stride {self.stride}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Float `[B, 3, H, W]` in 0..1 -> decoded `[B, N, 5 + nc]` float32 (pixels; probabilities).

        The result is an ordinary tensor (not an inference-mode one), so callers may edit it in place.
        """
        self.check_input(x)
        x = x.float()
        if self.fmt == "onnx":
            return self._run_onnx(x)
        if self.fmt == "pt":
            from utils.decode import decode

            model = self.model.model
            x = x.to(model.detect.anchors.device)  # val.py may move the model to a GPU
            x = x.contiguous(memory_format=torch.channels_last)  # no-op for detect.to_tensor's x
            if self._compile and x.device.type == "cpu":
                self._compile_for(x)
            if self.compiled:
                return self._compiled(x)  # eager (unpacked) for any other shape
            with torch.inference_mode():
                if self._pack_on_first_call and x.device.type == "cpu":
                    from utils.native_infer import swap_native
                    from utils.packed_conv import pack_convs

                    self._pack_on_first_call = False
                    example = torch.rand_like(x)  # a zero warm-up frame checks little
                    if self._swap_native:  # first: the convs it takes are not packed
                        self.native = swap_native(model, example)
                    self.packed = pack_convs(model, example)
                maps = model(x)
            with torch.no_grad():  # decoding outside inference mode gives a normal tensor without a copy
                return decode(maps, model.detect.anchors, model.detect.stride)
        with torch.inference_mode():
            y = self.model(x)
        return y.clone()  # outside inference mode: a normal tensor; costs N * (5 + nc) floats

    def _compile_for(self, x: torch.Tensor) -> None:
        """Compile model + decode for `x`'s shape once (utils.compiled); on failure stay eager and pack."""
        from utils.compiled import CompiledDecoder

        self._compile = False
        self._compiled = CompiledDecoder.build(self.model, torch.rand_like(x))  # random: a real parity check
        if self.compiled:
            self._pack_on_first_call = False  # packing would swap modules under the compiled graph's guards

    @property
    def compiled(self) -> bool:
        """Whether `compile` produced a graph that is in use."""
        return self._compiled is not None

    @property
    def compile_s(self) -> float | None:
        """Seconds the compile took; None when nothing was compiled."""
        return self._compiled.seconds if self._compiled is not None else None

    @property
    def fixed_input(self) -> bool:
        """Whether every input should be letterboxed to exactly `imgsz` (see the class docstring)."""
        return not self.dynamic or self.compiled

    def _run_onnx(self, x: torch.Tensor) -> torch.Tensor:
        arr = np.ascontiguousarray(x.cpu().numpy(), dtype=np.float32)
        if self.batch is None or arr.shape[0] == self.batch:
            return torch.from_numpy(self.session.run([self.output_name], {self.input_name: arr})[0])
        # a fixed-batch export: run in chunks of its batch size, padding the last one
        outs, n = [], arr.shape[0]
        for i in range(0, n, self.batch):
            chunk = arr[i:i + self.batch]
            if chunk.shape[0] < self.batch:
                pad = np.zeros((self.batch - chunk.shape[0], *chunk.shape[1:]), dtype=np.float32)
                chunk = np.concatenate((chunk, pad))
            outs.append(self.session.run([self.output_name], {self.input_name: chunk})[0])
        return torch.from_numpy(np.concatenate(outs)[:n])

    def warmup(self, imgsz: tuple[int, int] | None = None) -> None:
        """One pass on a zero image so the first real frame's timing excludes lazy initialisation."""
        h, w = imgsz or self.imgsz
        self(torch.zeros(self.batch or 1, 3, h, w))

    def __repr__(self) -> str:
        return (f"DetectBackend({self.file.name}: {self.fmt}, nc={self.nc}, stride={self.stride}, "
                f"imgsz={self.imgsz}, dynamic={self.dynamic})")


def _as_hw(size: Any) -> tuple[int, int]:
    if isinstance(size, (list, tuple)):
        return (int(size[0]), int(size[-1]))
    return (int(size), int(size))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0][:200] if text else type(e).__name__)
