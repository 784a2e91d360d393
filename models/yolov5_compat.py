"""Read YOLOv5 `.pt` files (ultralytics/yolov5 v6/v7, the `yolov5` pip package) without running them.

Such a file is a pickle of YOLOv5's own classes: `{'model': DetectionModel (v7) or Model (v6), 'ema':
the same or None, 'epoch', 'best_fitness', 'optimizer', 'opt', 'git', 'date', 'updates', ...}`, usually
in half precision. Loading it normally imports YOLOv5 and runs its code. Here it is read by torch's own
`weights_only` unpickler with a short allowlist (`allowed_globals()`):

- YOLOv5's module classes (`models.yolo.*`, `models.common.*`, the same under `yolov5.models.*`) and the
  `torch.nn` classes they hold become `Inert` placeholders: each keeps its pickled attributes in `.attrs`
  and has no behaviour (no import of YOLOv5, no call of anything in the file);
- numpy arrays and scalars (YOLOv5 keeps `best_fitness` as one) and `pathlib` paths become inert stubs or
  strings, decoded by our own code (numpy never unpickles anything);
- every other global (`os.system`, `builtins.eval`, `subprocess.Popen`, a class not on the list) is
  refused before anything runs: `YOLOv5Error("refuses to load global 'posix.system'")`.

`read_yolov5(path)` then takes the model YAML dict, class names, stride and anchors from the
placeholder tree and returns our checkpoint dict (docs/CONTRACTS.md, "Checkpoints"): the YOLOv5 rows parse
unchanged with `models.parse`, and the state_dict keys `model.<row>.*` become ours, `layers.<row>.*`.
`models.checkpoint.load_checkpoint` calls it for such files; `models/yolov5_convert.py` writes the result
as our own safe checkpoint.
"""
from __future__ import annotations

import copy
import functools
import re
import threading
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from torch import nn

import models.parse  # noqa: F401  (fills the registry the row check below reads)
from models.registry import REGISTRY

# Class names of YOLOv5 v6/v7 (models/yolo.py and models/common.py). All load as placeholders; the rows
# our parser cannot build (Focus, Segment, ...) are refused afterwards, naming the row.
YOLO_CLASSES = ("Detect", "Segment", "BaseModel", "DetectionModel", "SegmentationModel", "ClassificationModel",
                "Model")
COMMON_CLASSES = ("Conv", "DWConv", "DWConvTranspose2d", "Bottleneck", "BottleneckCSP", "CrossConv", "C3", "C3x",
                  "C3TR", "C3SPP", "C3Ghost", "SPP", "SPPF", "Focus", "GhostConv", "GhostBottleneck", "Contract",
                  "Expand", "Concat", "Proto", "Classify", "TransformerLayer", "TransformerBlock")
PACKAGE_PREFIXES = ("models.", "yolov5.models.")  # ultralytics/yolov5 checkouts, the `yolov5` pip package
TORCH_NN_CLASSES = (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.SiLU, nn.ReLU, nn.ReLU6, nn.LeakyReLU,
                    nn.Hardswish, nn.Sigmoid, nn.Identity, nn.Sequential, nn.ModuleList, nn.MaxPool2d,
                    nn.Upsample, nn.Dropout, nn.AdaptiveAvgPool2d, nn.Linear, nn.Flatten)
BN_EPS = 1e-3  # YOLOv5 sets every BatchNorm's eps to 1e-3 (initialize_weights); so do our blocks
MAX_DEPTH = 64  # nesting of modules or plain data; a crafted file may nest (or loop) without end
_LOCK = threading.Lock()  # `safe_globals` edits torch's process-wide allowlist: one reader at a time


class YOLOv5Error(ValueError):
    """Why a file cannot be read as a YOLOv5 checkpoint (one line; the caller adds the file name)."""


class Inert:
    """Stand-in for a pickled module: `kind` names the class it replaces, `attrs` holds its pickled
    `__dict__` (`_parameters`, `_buffers`, `_modules`, `yaml`, ...). No methods run on its contents."""

    kind = ""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            state = state[0]
        self.attrs: dict[str, Any] = dict(state) if isinstance(state, dict) else {}


class NDArrayStub:
    """What numpy's `_reconstruct` returns here: its `__setstate__` tuple is kept and decoded by `plain`."""

    def __setstate__(self, state: Any) -> None:
        self.state = state


class DTypeStub:
    """numpy's `dtype(name, align, copy)` as data: the type name and (from `__setstate__`) the byte order."""

    def __init__(self, name: Any = "", align: Any = False, copy: Any = False) -> None:
        self.name, self.order = str(name), "="

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
            self.order = state[1]

    def numpy(self) -> np.dtype:
        """The dtype, for plain numeric and bool types only (no object or structured arrays)."""
        if not re.fullmatch(r"[fiu][1248]|b1|\?", self.name):
            raise YOLOv5Error(f"holds a numpy array of type {self.name!r}; only numbers are accepted")
        return np.dtype(self.order + self.name)


def _np_reconstruct(subtype: Any, shape: Any, dtype: Any) -> NDArrayStub:
    return NDArrayStub()


def _np_scalar(dtype: Any, data: Any = b"") -> float | int | bool:
    if not isinstance(dtype, DTypeStub) or not isinstance(data, bytes):
        raise YOLOv5Error("holds a malformed numpy scalar")
    return np.frombuffer(data, dtype=dtype.numpy(), count=1)[0].item()


def _path(*parts: Any) -> str:
    """A pickled `pathlib` path, as a string."""
    return str(PurePosixPath(*[str(p) for p in parts]))


@functools.lru_cache(maxsize=1)
def allowed_globals() -> tuple[tuple[Any, str], ...]:
    """(object, "module.Name") pairs for `torch.serialization.safe_globals`: placeholders for YOLOv5's and
    torch.nn's module classes, stubs for numpy and pathlib. Nothing here imports or calls file content."""
    names = [f"{p}yolo.{c}" for p in PACKAGE_PREFIXES for c in YOLO_CLASSES]
    names += [f"{p}common.{c}" for p in PACKAGE_PREFIXES for c in COMMON_CLASSES]
    names += [f"{c.__module__}.{c.__qualname__}" for c in TORCH_NN_CLASSES]
    pairs: list[tuple[Any, str]] = [(type(n.rsplit(".", 1)[1], (Inert,), {"kind": n}), n) for n in names]
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        pairs += [(_np_reconstruct, f"{mod}._reconstruct"), (_np_scalar, f"{mod}.scalar")]
    pairs += [(NDArrayStub, "numpy.ndarray"), (DTypeStub, "numpy.dtype")]
    pairs += [(_path, f"pathlib.{c}") for c in ("Path", "PosixPath", "WindowsPath", "PurePosixPath",
                                                "PureWindowsPath")]
    return tuple(pairs)


def refused_global(e: BaseException) -> str | None:
    """The global torch's `weights_only` unpickler refused, from its message, named as Python 3 would
    resolve it (`builtins.` put back; protocol-2 names such as `commands.Popen` -> `subprocess.Popen`)."""
    m = re.search(r"GLOBAL (\S+)", re.sub(r"\x1b\[[0-9;]*m", "", str(e)))
    if not m:
        return None
    module, _, name = m.group(1).rpartition(".")
    module, name = NAME_MAPPING.get((module, name), (IMPORT_MAPPING.get(module, module), name))
    return f"{module or 'builtins'}.{name}"


def is_yolov5_global(name: str) -> bool:
    """Whether a pickled global belongs to YOLOv5's model code (listed or not)."""
    return any(name.startswith(p + m) for p in PACKAGE_PREFIXES for m in ("yolo.", "common."))


def unpickle(path: str | Path) -> Any:
    """Load the pickle with placeholders for the allowlist; raise YOLOv5Error naming a refused global.

    Only the allowlisted names the file mentions (read statically first) are allowlisted for the load:
    fewer entries, and torch's unpickler checks each opcode against them.
    """
    try:
        present = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001  (the load below reports what is wrong with the file)
        present = None
    pairs = [p for p in allowed_globals() if present is None or p[1] in present]
    with _LOCK, torch.serialization.safe_globals(pairs):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except YOLOv5Error:
            raise
        except Exception as e:  # noqa: BLE001  (UnpicklingError, RuntimeError, EOFError, TypeError...)
            name = refused_global(e)
            if name is not None:
                raise YOLOv5Error(f"refuses to load global '{name}' (a YOLOv5 checkpoint may hold only tensors, "
                                  "plain data and YOLOv5/torch.nn module classes)") from None
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise YOLOv5Error(f"unreadable or truncated ({first})") from None


def plain(x: Any, where: str, depth: int = 0) -> Any:
    """`x` as plain data (dict, list, str, numbers, None, tensors); numpy stubs decoded; else YOLOv5Error."""
    if depth > MAX_DEPTH:
        raise YOLOv5Error(f"{where}: nested deeper than {MAX_DEPTH} levels")
    if isinstance(x, dict):
        return {plain(k, where, depth + 1): plain(v, where, depth + 1) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v, where, depth + 1) for v in x]
    if x is None or isinstance(x, (str, int, float, bool, torch.Tensor)):
        return x
    if isinstance(x, NDArrayStub):
        st = x.state
        if not (isinstance(st, tuple) and len(st) == 5 and isinstance(st[2], DTypeStub) and isinstance(st[4], bytes)
                and all(isinstance(n, int) and n >= 0 for n in st[1])):
            raise YOLOv5Error(f"{where}: a malformed numpy array")
        dt = st[2].numpy()
        if int(np.prod(st[1])) * dt.itemsize != len(st[4]):
            raise YOLOv5Error(f"{where}: a numpy array whose data does not fit its shape {tuple(st[1])}")
        return np.frombuffer(st[4], dtype=dt).reshape(st[1], order="F" if st[3] else "C").tolist()
    raise YOLOv5Error(f"{where}: holds a {type(x).__name__} where plain data is expected")


def state_dict(node: Inert, prefix: str, out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The state_dict `nn.Module.state_dict()` would give for a placeholder tree (persistent buffers only),
    floating tensors cast to float32."""
    out = {} if out is None else out
    if prefix.count(".") > MAX_DEPTH:
        raise YOLOv5Error(f"module tree nested deeper than {MAX_DEPTH} levels at {prefix[:80]}...")
    a = node.attrs
    skip = a.get("_non_persistent_buffers_set") or set()
    tensors = [*(a.get("_parameters") or {}).items(), *((k, v) for k, v in (a.get("_buffers") or {}).items()
                                                        if k not in skip)]
    for k, t in tensors:
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise YOLOv5Error(f"{prefix}{k} is a {type(t).__name__}, not a tensor")
        t = t.detach()
        out[prefix + k] = t.float() if t.is_floating_point() else t.clone()
    for k, m in (a.get("_modules") or {}).items():
        if m is None:
            continue
        if not isinstance(m, Inert):
            raise YOLOv5Error(f"{prefix}{k} is a {type(m).__name__}, not a module")
        if m.kind.endswith(".BatchNorm2d") and abs(float(m.attrs.get("eps", BN_EPS)) - BN_EPS) > 1e-9:
            raise YOLOv5Error(f"{prefix}{k} has BatchNorm eps {m.attrs.get('eps')}; MobileYOLO's blocks use "
                              f"{BN_EPS} as YOLOv5 does")
        state_dict(m, f"{prefix}{k}.", out)
    return out


def _names(raw: Any, nc: int) -> list[str]:
    """YOLOv5's `names` (a list, or a dict {0: 'person', ...} since v7) as a list of `nc` strings."""
    if isinstance(raw, dict):
        try:
            order = sorted((int(k), str(v)) for k, v in raw.items())
        except (TypeError, ValueError):
            raise YOLOv5Error(f"class names {str(raw)[:80]} are not keyed 0..{nc - 1}") from None
        if [k for k, _ in order] != list(range(len(order))):
            raise YOLOv5Error(f"class names are keyed {[k for k, _ in order][:10]}, not 0..{len(order) - 1}")
        raw = [v for _, v in order]
    if not isinstance(raw, (list, tuple)) or len(raw) != nc:
        raise YOLOv5Error(f"has {len(raw) if isinstance(raw, (list, tuple)) else 'no'} class names for {nc} classes")
    return [str(n) for n in raw]


def _check_rows(cfg: dict[str, Any]) -> None:
    """Every row's module must be one our parser builds; YOLOv5's `activation` must be its default SiLU."""
    act = cfg.get("activation")
    if act not in (None, "nn.SiLU()"):
        raise YOLOv5Error(f"model YAML sets activation {act!r}; MobileYOLO builds YOLOv5 rows with SiLU only")
    rows = [r for s in ("backbone", "head") for r in (cfg.get(s) or [])]
    if not rows:
        raise YOLOv5Error("model YAML has no backbone/head rows")
    for i, row in enumerate(rows):
        name = row[2] if isinstance(row, (list, tuple)) and len(row) == 4 else None
        if not isinstance(name, str) or name not in REGISTRY:
            raise YOLOv5Error(f"model YAML row {i} {row!r} uses {name!r}, which MobileYOLO has no block for "
                              "(YOLOv5 v6+ detection models with Conv/C3/SPPF/Concat/Detect rows are supported)")
    if rows[-1][2] != "Detect":
        raise YOLOv5Error(f"last row {rows[-1]!r} is not Detect: only detection models are supported")


def _convert_model(root: Inert) -> dict[str, Any]:
    """yaml, names, stride, anchors (pixels) and state_dict (our keys) of one YOLOv5 model placeholder."""
    a = root.attrs
    cfg, seq = a.get("yaml"), (a.get("_modules") or {}).get("model")
    if not isinstance(cfg, dict) or not isinstance(seq, Inert):
        raise YOLOv5Error(f"its {root.kind} has no model YAML dict or no `model` rows")
    cfg = plain(copy.deepcopy(cfg), "model YAML")
    _check_rows(cfg)
    rows = list((seq.attrs.get("_modules") or {}).values())
    det = rows[-1] if rows else None
    if not isinstance(det, Inert) or not det.kind.endswith("yolo.Detect"):
        raise YOLOv5Error(f"last module is {getattr(det, 'kind', type(det).__name__)}, not YOLOv5's Detect")
    last = len(rows) - 1
    sd = state_dict(seq, "layers.")
    stride, anchors = det.attrs.get("stride", a.get("stride")), sd.get(f"layers.{last}.anchors")
    if not isinstance(stride, torch.Tensor) or not isinstance(anchors, torch.Tensor) or anchors.dim() != 3 \
            or stride.numel() != anchors.shape[0]:
        raise YOLOv5Error("its Detect has no strides or anchors of matching levels")
    stride = stride.detach().float().flatten()
    anchors = anchors * stride.view(-1, 1, 1)  # YOLOv5 keeps anchors in grid units; ours are pixels
    sd[f"layers.{last}.anchors"], sd[f"layers.{last}.stride"] = anchors, stride.clone()
    sd.pop(f"layers.{last}.anchor_grid", None)  # a buffer in YOLOv5 before v6, rebuilt from anchors
    nc = int(det.attrs.get("nc", cfg.get("nc", -1)))
    if cfg.get("nc") != nc:
        raise YOLOv5Error(f"model YAML says nc={cfg.get('nc')!r} but its Detect has {nc} classes")
    cfg["anchors"] = [[round(v, 5) for v in level] for level in anchors.view(len(stride), -1).tolist()]
    if isinstance(a.get("yaml_file"), str):
        cfg["yaml_file"] = a["yaml_file"]
    return {"yaml": cfg, "names": _names(a.get("names"), nc), "stride": stride, "anchors": anchors, "model": sd}


def _number(x: Any, where: str, default: float) -> float:
    x = plain(x, where)
    while isinstance(x, list) and len(x) == 1:  # YOLOv5's best_fitness is a numpy array of shape (1,)
        x = x[0]
    return float(x) if isinstance(x, (int, float)) else default


def read_yolov5(path: str | Path) -> dict[str, Any]:
    """Our checkpoint dict (without `version`) from a YOLOv5 v6/v7 `.pt` file; raises YOLOv5Error.

    `model` holds the weights of YOLOv5's `model`, `ema` those of its `ema` (None when absent, as in
    released weights), both float32 under our keys; `args` is None (a YOLOv5 run cannot be resumed here,
    only fine-tuned); `hyp` is the run's hyp dict when the file has one; `converted_from` names the class.
    """
    raw = unpickle(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), Inert):
        raise YOLOv5Error("not a YOLOv5 checkpoint (no pickled YOLOv5 model under 'model')")
    main = _convert_model(raw["model"])
    ema = _convert_model(raw["ema"]) if isinstance(raw.get("ema"), Inert) else None
    opt = raw.get("opt") if isinstance(raw.get("opt"), dict) else raw.get("train_args")
    hyp = opt.get("hyp") if isinstance(opt, dict) else None
    hyp = hyp if isinstance(hyp, dict) else raw["model"].attrs.get("hyp")
    try:
        hyp = plain(hyp, "hyp") if isinstance(hyp, dict) else {}
    except YOLOv5Error:
        hyp = {}  # informative only: never needed to build or run the model
    date = raw.get("date")
    return {
        "model": main["model"], "ema": ema["model"] if ema else None, "yaml": main["yaml"],
        "names": main["names"], "anchors": main["anchors"], "stride": main["stride"], "hyp": hyp,
        "args": None, "epoch": int(_number(raw.get("epoch"), "epoch", -1)), "optimizer": None,
        "best_fitness": _number(raw.get("best_fitness"), "best_fitness", 0.0),
        "updates": int(_number(raw.get("updates"), "updates", 0)),
        "date": date if isinstance(date, str) else "", "converted_from": f"YOLOv5 {raw['model'].kind}",
    }
