"""One inference front for every model format: our `.pt` checkpoints, `.torchscript` and `.onnx` exports.

`DetectBackend(weights)` loads the file by suffix and recovers the class names, the largest stride and
the image size from the file itself (checkpoint keys, TorchScript `config.json` extra file, ONNX
`metadata_props`). Calling it on a float `[B, 3, H, W]` batch in 0..1 returns the decoded
`[B, N, 5 + nc]` tensor (columns cx, cy, w, h in network-input pixels, obj, class probabilities; see
`utils.ops.decode.decode`), whatever the format, so detect.py and val.py never branch on it.

Safety: checkpoints are read with `torch.load(weights_only=True)` (via `models.checkpoint`), so a
pickle that would run code is refused. TorchScript archives are read by TorchScript's own restricted
loader. Every unusable file raises `BackendError` naming it.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from utils.core.errors import UserError
from utils.core.errors import first_line as _first_line
from utils.export.metadata import METADATA_FILE, parse_metadata
from utils.infer.compiled import CompiledDecoder
from utils.infer.runtime import physical_cores
from utils.ops.decode import Decoder, decode

PT_SUFFIXES = (".pt", ".pth")
TS_SUFFIXES = (".torchscript", ".ts")
ONNX_SUFFIXES = (".onnx",)


class BackendError(UserError, ValueError):
    """A weights file that is missing, of an unknown type, or not a MobileYOLO model."""


def _parse_metadata(meta: dict[str, Any], file: Path) -> dict[str, Any]:
    out = parse_metadata(meta)
    if out is None:
        raise BackendError(f"{file}: no MobileYOLO metadata (names/stride/imgsz) in this file; export it "
                           f"with `python export.py --weights best.pt`")
    return out


class DetectBackend:
    """Load `weights` (.pt/.pth checkpoint, .torchscript, .onnx) for CPU inference.

    Attributes: `fmt` ('pt', 'torchscript', 'onnx'), `names: list[str]`, `nc`, `stride: int` (largest),
    `imgsz: tuple[int, int]` (h, w: the export size, or the training size for checkpoints),
    `dynamic: bool` (any input size multiple of `stride` works; False for fixed-shape exports, which
    need exactly `imgsz`), `batch: int | None` (fixed batch of a static export, else None).
    `threads` sets ONNX Runtime's intra-op threads (default: physical cores); torch's threads are the
    process's own setting (`utils.infer.runtime.apply_policy`, called by the scripts' `main()`).
    `spin`: whether ONNX Runtime's threads spin-wait between ops inside a run (its own default); they
    stop spinning when each run ends, so NMS and drawing get the cores back. Pass False on a machine
    other work keeps busy (`utils.infer.runtime.spin_ok` decides that for the scripts).
    `session_config`: the ONNX Runtime config entries that applies.
    `compile` (.pt with `fuse`, CPU): torch.compile model + decode on the first call for that call's
    shape and memory layout (`utils.infer.compiled`; seconds once, then faster); inputs of another shape
    run eager. `compiled` then says whether it is in use and `compile_s` how long it took.
    `fixed_input`: whether callers should letterbox every frame to one shape (a fixed-size export's
    `imgsz`; once compiled, the compiled shape, as others run eager).
    The constructor and calls change no process-wide state and never rewrite the model.
    """

    def __init__(self, weights: str | Path, threads: int | None = None, fuse: bool = True,
                 spin: bool = True, compile: bool = False) -> None:
        self.spin = bool(spin)
        self._compiled, self._compile = None, False  # utils.infer.compiled.CompiledDecoder once built
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
            self._load_pt(fuse)
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
    def _load_pt(self, fuse: bool) -> None:

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
        self.fmt, self.model = "pt", Decoder(model).eval()
        self.names = [str(n) for n in ckpt["names"]]
        self.strides = [float(s) for s in model.detect.stride.tolist()]
        self.stride = int(max(self.strides))
        args = ckpt.get("args") or {}
        size = args.get("imgsz", 320) if isinstance(args, dict) else 320
        self.imgsz = _as_hw(size)

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
        self.fmt = "torchscript"

    def _load_onnx(self) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = self.threads or physical_cores()
        # Spinning threads answer the next op sooner, but left spinning after a run they steal the cores
        # from our own NMS and drawing (docs/PERFORMANCE.md), hence the stop after each run.
        self.session_config = ({"session.force_spinning_stop": "1"} if self.spin
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

            model = self.model.model
            x = x.to(model.detect.anchors.device)  # val.py may move the model to a GPU
            x = x.contiguous(memory_format=torch.channels_last)  # no-op for detect.to_tensor's x
            if self._compile and x.device.type == "cpu":
                self._compile_for(x)
            if self.compiled:
                return self._compiled(x)  # eager for any other shape
            with torch.inference_mode():
                maps = model(x)
            with torch.no_grad():  # decoding outside inference mode gives a normal tensor without a copy
                return decode(maps, model.detect.anchors, model.detect.stride)
        with torch.inference_mode():
            y = self.model(x)
        return y.clone()  # outside inference mode: a normal tensor; costs N * (5 + nc) floats

    def _compile_for(self, x: torch.Tensor) -> None:
        """Compile model + decode for `x`'s shape once (utils.infer.compiled); on failure stay eager."""

        self._compile = False
        self._compiled = CompiledDecoder.build(self.model, torch.rand_like(x))  # random: a real parity check

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

