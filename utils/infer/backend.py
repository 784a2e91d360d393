"""One inference front for every model format: `.pt` checkpoints and every export of `export.py`.

`DetectBackend(weights)` loads the file (or export folder) by suffix and recovers the class names, the
largest stride and the image size from the file itself (checkpoint keys, TorchScript `config.json` extra
file, ONNX `metadata_props`, a folder's `metadata.yaml`). Formats other than .pt and TorchScript run
through one runner class each in `utils/infer/formats/` (docs/CONTRACTS.md, "Formats"). Calling it on a float `[B, 3, H, W]` batch in 0..1 returns the decoded
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
from utils.core.errors import first_line as _first_line
from utils.export.metadata import METADATA_FILE, parse_metadata
from utils.infer.compiled import CompiledDecoder
from utils.infer.formats.common import BackendError
from utils.infer.formats.executorch import ExecuTorchRunner
from utils.infer.formats.ncnn import NCNNRunner
from utils.infer.formats.onnxrt import ONNXRunner
from utils.infer.formats.openvino import OpenVINORunner
from utils.infer.formats.tflite import TFLiteRunner
from utils.infer.runtime import idle_cores, physical_cores
from utils.ops.decode import Decoder, decode

__all__ = ["BackendError", "DetectBackend", "format_of"]

PT_SUFFIXES = (".pt", ".pth")
TS_SUFFIXES = (".torchscript", ".ts")
ONNX_SUFFIXES = (".onnx",)
# format -> (folder name ending, file suffixes); the runner classes are in RUNNERS
RUNNER_FORMATS = {"onnx": ("", ONNX_SUFFIXES), "openvino": ("_openvino_model", (".xml",)),
                  "ncnn": ("_ncnn_model", (".param",)), "tflite": ("", (".tflite",)),
                  "executorch": ("", (".pte",))}
RUNNERS: dict[str, type] = {"onnx": ONNXRunner, "openvino": OpenVINORunner, "ncnn": NCNNRunner,
                            "tflite": TFLiteRunner, "executorch": ExecuTorchRunner}
ALL_SUFFIXES = PT_SUFFIXES + TS_SUFFIXES + tuple(s for _, sfx in RUNNER_FORMATS.values() for s in sfx)


def format_of(path: str | Path) -> str | None:
    """The format a weights path names ('pt', 'torchscript', 'onnx', 'openvino', 'ncnn', 'tflite',
    'executorch'), from its suffix or its export-folder name; None when unknown."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in PT_SUFFIXES:
        return "pt"
    if suffix in TS_SUFFIXES:
        return "torchscript"
    for fmt, (folder, suffixes) in RUNNER_FORMATS.items():
        if suffix in suffixes or (folder and path.name.endswith(folder)):
            return fmt
    return None


def _parse_metadata(meta: dict[str, Any], file: Path) -> dict[str, Any]:
    out = parse_metadata(meta)
    if out is None:
        raise BackendError(f"{file}: no MobileYOLO metadata (names/stride/imgsz) in this file; export it "
                           f"with `python export.py --weights best.pt`")
    return out


class DetectBackend:
    """Load `weights` (.pt/.pth checkpoint, .torchscript, .onnx, an `*_openvino_model/` folder or `.xml`,
    an `*_ncnn_model/` folder or `.param`, `.tflite`, `.pte`) for CPU inference.

    Attributes: `fmt` ('pt', 'torchscript', 'onnx', 'openvino', 'ncnn', 'tflite', 'executorch'),
    `runner` (the `utils/infer/formats` runner of the last five), `names: list[str]`, `nc`, `stride: int` (largest),
    `imgsz: tuple[int, int]` (h, w: the export size, or the training size for checkpoints),
    `dynamic: bool` (any input size multiple of `stride` works; False for fixed-shape exports, which
    need exactly `imgsz`), `batch: int | None` (fixed batch of a static export, else None).
    `threads` sets the runtime's threads (ONNX Runtime default: physical cores); torch's threads are the
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
        if not self.file.exists():
            raise BackendError(f"{self.file}: weights file not found")
        if threads is not None and int(threads) < 1:
            raise BackendError(f"threads must be >= 1, got {threads}")
        self.threads = int(threads) if threads else None
        self.batch: int | None = None
        self.dynamic = True
        fmt = format_of(self.file)
        if fmt is None or (self.file.is_dir() and fmt in ("pt", "torchscript")):
            raise BackendError(f"{self.file}: unknown weights type '{self.file.suffix or self.file.name}'; expected "
                               f"one of {', '.join(ALL_SUFFIXES)} or an *_openvino_model / *_ncnn_model folder")
        if fmt == "pt":
            self._load_pt(fuse)
            self._compile = fuse and compile
        elif fmt == "torchscript":
            self._load_torchscript()
        else:
            self._load_runner(fmt)
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

    def _load_runner(self, fmt: str) -> None:
        if fmt not in RUNNERS:
            raise BackendError(f"{self.file}: {fmt} exports are not supported by this version")
        if fmt == "onnx":
            self.runner = ONNXRunner(self.file, self.threads or physical_cores(), spin=self.spin)
            self.session, self.session_config = self.runner.session, self.runner.session_config
        else:
            # ncnn's OpenMP workers spin-wait: one per busy core made a loaded machine ~100x slower
            default = idle_cores() if fmt == "ncnn" else physical_cores()
            self.runner = RUNNERS[fmt](self.file, self.threads or default)
        self._apply_metadata(_parse_metadata(self.runner.metadata, self.runner.file))
        self.dynamic, self.batch, self.fmt = bool(self.runner.dynamic), self.runner.batch, fmt
        if fmt == "onnx":  # another model's graph under our metadata: channels in or 5 + nc out disagree
            i_shape, o_shape = self.session.get_inputs()[0].shape, self.session.get_outputs()[0].shape
            if any(isinstance(g, int) and g != w for g, w in ((i_shape[1], 3), (o_shape[2], 5 + len(self.names)))):
                raise BackendError(f"{self.file}: input {i_shape} / output {o_shape} do not fit its metadata "
                                   f"([b, 3, h, w] in, [b, N, 5 + {len(self.names)}] out): another model's graph")

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
        if self.fmt in RUNNERS:
            return self._run_runner(x)
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

    def _run_runner(self, x: torch.Tensor) -> torch.Tensor:
        arr = np.ascontiguousarray(x.cpu().numpy(), dtype=np.float32)
        if self.batch is None or arr.shape[0] == self.batch:
            return torch.from_numpy(np.asarray(self.runner(arr), dtype=np.float32))
        # a fixed-batch export: run in chunks of its batch size, padding the last one
        outs, n = [], arr.shape[0]
        for i in range(0, n, self.batch):
            chunk = arr[i:i + self.batch]
            if chunk.shape[0] < self.batch:
                pad = np.zeros((self.batch - chunk.shape[0], *chunk.shape[1:]), dtype=np.float32)
                chunk = np.concatenate((chunk, pad))
            outs.append(self.runner(chunk))
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

