"""YOLOv5 `.pt` files: read safely (models/yolov5_compat.py), converted (models/yolov5_convert.py), taken by
train/val/detect/export.

The files are built here without YOLOv5: throwaway nn.Module classes named `models.yolo.DetectionModel`,
`models.common.Conv`, ... (registered in sys.modules only while `torch.save` writes them) hold a copy of
our yolov5n rows, shaped as YOLOv5 pickles them (`model` Sequential, `yaml`, `names`, `stride`, Detect
anchors in grid units, usually half precision, `best_fitness` a numpy array).
"""
from __future__ import annotations

import importlib
import builtins
import contextlib
import copy
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from models import common, head
from models.checkpoint import (
    CheckpointError,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from models.yolo import Model
from models.yolov5_convert import convert
from models.yolov5_convert import main as convert_main
from utils.core.errors import cli_main

ROOT = Path(__file__).resolve().parents[2]


def _fake(module: str, name: str) -> type:
    cls = type(name, (nn.Module,), {})
    cls.__module__, cls.__qualname__ = module, name
    return cls


class _Unlisted(nn.Module):
    """A class YOLOv5 does not have, under its module: a real one could run anything on load."""

    def __setstate__(self, state):
        Path(state["marker"]).write_text("ran")


_Unlisted.__module__, _Unlisted.__qualname__ = "models.common", "Payload"
COMMON = {n: _fake("models.common", n) for n in ("Conv", "C3", "Bottleneck", "SPPF", "Concat")}
COMMON["Payload"] = _Unlisted
YOLO = {n: _fake("models.yolo", n) for n in ("Detect", "DetectionModel", "Model")}
OURS = {common.Conv: COMMON["Conv"], common.C3: COMMON["C3"], common.Bottleneck: COMMON["Bottleneck"],
        common.SPPF: COMMON["SPPF"], common.Concat: COMMON["Concat"], common.Upsample: nn.Upsample,
        head.Detect: YOLO["Detect"]}


@contextlib.contextmanager
def yolov5_modules():
    """`models.yolo` / `models.common` resolve to modules holding the fake classes, only inside the block."""
    mods = {k: types.ModuleType(k) for k in ("models.yolo", "models.common")}
    for c in [*COMMON.values(), *YOLO.values()]:
        setattr(mods[c.__module__], c.__qualname__, c)
    saved = {k: sys.modules[k] for k in mods}
    sys.modules.update(mods)
    try:
        yield
    finally:
        sys.modules.update(saved)


def yolov5_tree(model: Model, cls: str = "DetectionModel", names: object = None) -> nn.Module:
    """A YOLOv5-shaped copy of `model` (same weights): class names, key layout and Detect buffers as YOLOv5's."""
    m = copy.deepcopy(model)
    for mod in m.modules():
        if type(mod) in OURS:
            mod.__class__ = OURS[type(mod)]
    det = m.layers[-1]
    stride = det._buffers.pop("stride").clone()  # YOLOv5: a plain attribute, not a buffer
    det.anchors = det.anchors / stride.view(-1, 1, 1)  # YOLOv5: grid units
    det.stride, det.grid, det.anchor_grid, det.inplace = stride, [torch.empty(0)] * 3, [torch.empty(0)] * 3, True
    root = YOLO[cls]()
    root.model = nn.Sequential(*m.layers)
    cfg = dict(m.yaml)
    cfg.pop("yaml_file", None)
    root.yaml, root.yaml_file, root.stride, root.save, root.inplace = cfg, "yolov5n.yaml", stride, sorted(m.save), True
    root.names = names if names is not None else {i: f"c{i}" for i in range(det.nc)}
    root.hyp = {"lr0": 0.01}
    return root


def write_yolov5(path: Path, model: Model, ema: Model | None = None, half: bool = True, cls: str = "DetectionModel",
                 names: object = None, before: dict | None = None, after: dict | None = None) -> Path:
    """A YOLOv5 v6/v7-layout `.pt` of `model` (and `ema`), with extra entries `before`/`after` the model."""
    trees = [yolov5_tree(x, cls, names) if x is not None else None for x in (model, ema)]
    if half:  # YOLOv5's own `_apply` halves the Detect stride attribute too
        trees = [t.half() if t is not None else None for t in trees]
        for t in trees:
            if t is not None:
                t.stride = t.model[-1].stride = t.stride.half()
    ck = {**(before or {}), "epoch": 3, "best_fitness": np.array([0.42]), "model": trees[0], "ema": trees[1],
          "updates": 7, "optimizer": None, "opt": {"imgsz": 64, "hyp": {"lr0": 0.01}}, "git": {"commit": "abc"},
          "date": "2024-01-01T00:00:00", **(after or {})}
    with yolov5_modules():
        torch.save(ck, path)
    return path


def yolov5n(nc: int = 3, seed: int = 0) -> Model:
    """Our yolov5n with random weights and BN statistics away from (0, 1), in eval mode."""
    torch.manual_seed(seed)
    m = Model(ROOT / "models" / "yolov5n.yaml", nc=nc)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
    return m.eval()


@pytest.fixture(scope="module")
def models_pair() -> tuple[Model, Model]:
    return yolov5n(seed=0), yolov5n(seed=1)


def _outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("cls, use_ema, half, names", [
    ("DetectionModel", True, True, {0: "person", 1: "bicycle", 2: "car"}),  # v7, as a last.pt mid-run
    ("Model", False, True, ["person", "bicycle", "car"]),  # v6 released weights: EMA None, names a list
    ("DetectionModel", False, False, {2: "car", 0: "person", 1: "bicycle"}),  # float32, dict out of order
])
def test_loads_with_the_outputs_of_the_model_it_was_made_from(tmp_path, models_pair, cls, use_ema, half, names):
    model, other = models_pair
    f = write_yolov5(tmp_path / "yolov5n.pt", other if use_ema else model, ema=model if use_ema else None,
                     half=half, cls=cls, names=names)
    ck = load_checkpoint(f)
    assert ck["converted_from"] == f"YOLOv5 models.yolo.{cls}" and ck["names"] == ["person", "bicycle", "car"]
    assert (ck["ema"] is not None) == use_ema and ck["args"] is None and ck["optimizer"] is None
    assert ck["epoch"] == 3 and ck["best_fitness"] == pytest.approx(0.42) and ck["updates"] == 7
    assert all(v.dtype != torch.float16 for v in ck["model"].values())
    assert torch.equal(ck["anchors"], model.detect.anchors) and torch.equal(ck["stride"], model.stride)
    loaded = model_from_checkpoint(ck)  # the EMA's weights when present
    ref = copy.deepcopy(model).half().float() if half else model
    x = torch.rand(2, 3, 64, 96)
    for a, b in zip(_outputs(loaded, x), _outputs(ref, x)):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    assert model_from_checkpoint(ck, ema=False).names == ["person", "bicycle", "car"]


def test_the_file_really_is_foreign(tmp_path, models_pair):
    """Normal unpickling cannot resolve the YOLOv5 class names here; our loader never looks them up."""
    f = write_yolov5(tmp_path / "y.pt", models_pair[0])
    assert "models.yolo.DetectionModel" in torch.serialization.get_unsafe_globals_in_checkpoint(f)
    with pytest.raises(pickle.UnpicklingError, match="(?i)weights only load failed"):
        torch.load(f, weights_only=True)
    # what a normal unpickler would look up: our own models.yolo has no such class, so it would fail
    with pytest.raises(AttributeError, match="DetectionModel"):
        importlib.import_module("models.yolo").DetectionModel  # noqa: B018


class _Call:
    """Unpickling calls `fn(*args)`: stands for a payload in a crafted file."""

    def __init__(self, fn: object, *args: object) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


@pytest.mark.parametrize("kind", ["system", "eval", "popen", "unlisted", "system-first"])
def test_pickled_code_is_refused_naming_the_global(tmp_path, models_pair, kind):
    marker = tmp_path / "pwned"
    payload = {
        "system": (_Call(os.system, f"touch {marker}"), f"{os.system.__module__}.system"),
        "system-first": (_Call(os.system, f"touch {marker}"), f"{os.system.__module__}.system"),
        "eval": (_Call(builtins.eval, f"open({str(marker)!r}, 'w')"), "builtins.eval"),
        "popen": (_Call(subprocess.Popen, ["touch", str(marker)]), "subprocess.Popen"),
        "unlisted": (_Unlisted(), "models.common.Payload"),
    }
    obj, name = payload[kind]
    if kind == "unlisted":
        obj.marker = str(marker)
    where = {"before": {"wandb_id": obj}} if kind == "system-first" else {"after": {"opt": {"hyp": obj}}}
    f = write_yolov5(tmp_path / "evil.pt", models_pair[0], **where)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(f)
    msg = str(e.value)
    assert msg.startswith(f"{f}: refuses to load global '{name}'") and "\n" not in msg
    assert not marker.exists()


def test_truncated_unsupported_and_not_yolov5_files(tmp_path, models_pair):
    f = write_yolov5(tmp_path / "y.pt", models_pair[0])
    cut = tmp_path / "cut.pt"
    cut.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pt: .*unreadable or truncated") as e:
        load_checkpoint(cut)
    assert "\n" not in str(e.value)

    focus = yolov5n()
    focus.yaml["backbone"][0] = [-1, 1, "Focus", [64, 3]]  # YOLOv5 before v6.0
    with pytest.raises(CheckpointError, match=r"focus\.pt: model YAML row 0 .*'Focus', which MobileYOLO has no block"):
        load_checkpoint(write_yolov5(tmp_path / "focus.pt", focus))

    relu = yolov5n()
    relu.yaml["activation"] = "nn.ReLU()"
    with pytest.raises(CheckpointError, match=r"relu\.pt: model YAML sets activation 'nn.ReLU\(\)'"):
        load_checkpoint(write_yolov5(tmp_path / "relu.pt", relu))

    with pytest.raises(CheckpointError, match=r"names\.pt: has 2 class names for 3 classes"):
        load_checkpoint(write_yolov5(tmp_path / "names.pt", models_pair[0], names=["a", "b"]))

    loop = yolov5_tree(models_pair[0])
    loop.model[0].add_module("again", loop.model)  # a crafted file may loop; the walk stops, with a message
    f = tmp_path / "loop.pt"
    with yolov5_modules():
        torch.save({"model": loop, "ema": None}, f)
    with pytest.raises(CheckpointError, match=r"loop\.pt: module tree nested deeper than 64 levels"):
        load_checkpoint(f)

    bare = tmp_path / "bare.pt"  # YOLOv5 classes, but no model under 'model'
    with yolov5_modules():
        torch.save({"model": None, "ema": YOLO["Detect"]()}, bare)
    with pytest.raises(CheckpointError, match=r"bare\.pt: not a YOLOv5 checkpoint"):
        load_checkpoint(bare)


def test_converter_writes_a_weights_only_checkpoint(tmp_path, models_pair, capsys):
    model, other = models_pair
    f = write_yolov5(tmp_path / "yolov5n.pt", other, ema=model)
    out = convert(f, tmp_path / "ours.pt")
    ck = torch.load(out, map_location="cpu", weights_only=True)  # plain data: no global to allowlist
    assert ck["converted_from"] == "YOLOv5 models.yolo.DetectionModel" and ck["version"] == 1
    assert ck["yaml"]["yaml_file"] == "yolov5n.yaml" and ck["names"] == ["c0", "c1", "c2"]
    x = torch.rand(1, 3, 64, 64)
    for a, b in zip(_outputs(model_from_checkpoint(out), x), _outputs(copy.deepcopy(model).half().float(), x)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    assert "3 classes" in capsys.readouterr().out

    assert cli_main("yolov5_convert.py", convert_main, [str(f)]) == 0  # default: <stem>-mobileyolo.pt beside it
    assert (tmp_path / "yolov5n-mobileyolo.pt").is_file()
    assert cli_main("yolov5_convert.py", convert_main, [str(f), "--out", str(f)]) == 2
    assert "is the input file" in capsys.readouterr().err
    own = save_checkpoint({**ck, "converted_from": None}, tmp_path / "own.pt")
    with pytest.raises(CheckpointError, match="already a MobileYOLO checkpoint"):
        convert(own, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_inference_front_reads_the_file_as_it_reads_the_conversion(tmp_path, models_pair):
    from utils.infer.backend import BackendError, DetectBackend

    f = write_yolov5(tmp_path / "yolov5n.pt", models_pair[0])
    a, b = DetectBackend(f), DetectBackend(convert(f, tmp_path / "ours.pt"))
    assert a.names == b.names == ["c0", "c1", "c2"] and a.stride == 32 and a.strides == [8.0, 16.0, 32.0]
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(a(x), b(x))
    marker = tmp_path / "pwned"
    evil = write_yolov5(tmp_path / "evil.pt", models_pair[0], after={"git": _Call(os.system, f"touch {marker}")})
    with pytest.raises(BackendError, match=r"evil\.pt: refuses to load global '(posix|nt)\.system'"):
        DetectBackend(evil)
    assert not marker.exists()


@pytest.mark.slow
def test_val_detect_export_and_train_take_the_file(tmp_path, capsys):
    import detect
    import export
    import train
    import val
    from utils.data.synthetic import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "ds", n_train=4, n_val=2, imgsz=64, nc=2, seed=1)
    f = write_yolov5(tmp_path / "yolov5n.pt", yolov5n(nc=2), names=["red", "green"])
    m = val.run(data, f, imgsz=64, batch_size=2, conf_thres=0.25, workers=0, plots=False, project=str(tmp_path / "val"))
    assert 0.0 <= m.map50 <= 1.0
    images = sorted((Path(data).parent / "images" / "val").glob("*"))
    assert images
    assert detect.main(["--weights", str(f), "--source", str(images[0]), "--imgsz", "64", "--save-txt",
                        "--project", str(tmp_path / "det"), "--name", "exp"]) in (0, None)
    assert (tmp_path / "det" / "exp").is_dir()
    assert Path(export.run(f, include=["onnx"], imgsz=64, outdir=tmp_path / "exp")["onnx"]).is_file()
    capsys.readouterr()
    out = train.run(data=str(data), weights=str(f), imgsz=64, batch_size=2, epochs=1, workers=0, noplots=True,
                    noautoanchor=True, project=str(tmp_path / "runs"), hyp_overrides={"nbs": 2})
    text = capsys.readouterr().out
    assert "a YOLOv5 checkpoint; training its own model (yolov5n.yaml)" in text
    total = len(yolov5n(nc=2).state_dict())
    assert f"Transferred {total - 1}/{total} items" in text  # all but the anchors (AutoAnchor's)
    assert model_from_checkpoint(out["last"]).yaml["yaml_file"] == "yolov5n.yaml"
