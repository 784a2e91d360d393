"""Typed training arguments (the CLI flags of train.py) and YAML writing of `args.yaml` / `hyp.yaml`."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from utils.core.errors import FlagError
from utils.train.files import atomic_write_text

NAN_LIMIT = 5  # --nan-limit default: optimizer steps skipped for a non-finite loss in a row before a run stops
DEFAULT_EPOCHS = 40  # `python train.py`: fits in 15 minutes on 2 CPU cores (docs/PERFORMANCE.md has the measured time)


@dataclass
class TrainConfig:
    """Everything `train.run()` needs; field names are train.py's flags with `-` -> `_`.

    `hyp` is a hyp YAML path or an already loaded dict; `hyp_overrides` (not a CLI flag) patches
    single keys on top, which tests use to switch off mosaic or warm-up. `resume` is False, True (the
    most recent `last.pt` under `project`) or a checkpoint path. `save_dir` is filled in by run().
    """

    data: str = "data/bccd.yaml"
    cfg: str = "models/mobilenetv3-small-yolo.yaml"
    weights: str = ""
    backbone_weights: str = ""
    hyp: str | dict = "data/hyps/short-cpu.yaml"
    epochs: int = DEFAULT_EPOCHS
    batch_size: int = 16
    imgsz: int = 320
    device: str = "cpu"
    workers: int = 2
    cache: str | None = None
    rect: bool = False
    patience: int = 100
    resume: bool | str = False
    freeze: int = 0
    optimizer: str = "auto"
    cos_lr: bool = False
    label_smoothing: float = 0.0
    single_cls: bool = False
    seed: int = 0
    project: str = "runs/train"
    name: str = "exp"
    exist_ok: bool = False
    noval: bool = False
    nosave: bool = False
    save_period: int = -1
    noautoanchor: bool = False
    sync_bn: bool = False
    noplots: bool = False
    nan_limit: int = NAN_LIMIT
    resume_data: str = ""
    accel: bool = True  # --no-accel: False; CPU training kernels swapped in by utils.accel.swap.accelerate
    hyp_overrides: dict = field(default_factory=dict)
    save_dir: str = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `FlagError` (a ValueError) naming the flag for values train.py cannot use."""
        checks = [
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.imgsz >= 32, f"--imgsz must be >= 32, got {self.imgsz}"),
            (self.workers >= 0, f"--workers must be >= 0, got {self.workers}"),
            (self.freeze >= 0, f"--freeze must be >= 0, got {self.freeze}"),
            (self.nan_limit >= 1, f"--nan-limit must be >= 1, got {self.nan_limit}"),
            (self.patience >= 0, f"--patience must be >= 0 (0 = never stop early), got {self.patience}"),
            (self.optimizer in ("auto", "SGD", "Adam", "AdamW"),
             f"--optimizer must be auto, SGD, Adam or AdamW, got {self.optimizer!r}"),
            (self.cache in (None, "ram"), f"--cache: only 'ram' is supported, got {self.cache!r}"),
            (0.0 <= self.label_smoothing < 1.0, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise FlagError(msg)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (str/int/float/bool/None/dict) for args.yaml and checkpoints."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "args") -> TrainConfig:
        """Rebuild from `to_dict()` output; unknown keys are ignored with a warning naming `source`."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            print(f"WARNING {source}: ignoring unknown training args {unknown}")
        return cls(**{k: v for k, v in d.items() if k in names})


def _plain(v: Any) -> Any:
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def write_yaml(path: str | Path, data: dict[str, Any]) -> Path:
    """Write `data` as YAML (keys in insertion order), atomically (`utils.train.files`); return the path."""
    return atomic_write_text(path, yaml.safe_dump(_plain(data), sort_keys=False))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; ValueError naming the file if it is not one."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a YAML mapping, got {type(data).__name__}")
    return data
