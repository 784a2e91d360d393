"""Model: a YAML-built detector or classifier, plus the `python models/yolo.py --cfg F` summary CLI."""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as `python models/yolo.py`: import from the repo root, not from models/ (script only).
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import copy  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import yaml  # noqa: E402
from torch import nn  # noqa: E402

from models.common import ConvBNAct  # noqa: E402
from models.head import Detect  # noqa: E402
from models.mobilenetv3 import Classify  # noqa: E402
from models.parse import parse_model  # noqa: E402
from models.registry import ModelConfigError  # noqa: E402
from models.summary import summary_line, summary_table  # noqa: E402
from utils.core.errors import MissingFileError, cli_main, yaml_error  # noqa: E402

PROBE_SIZE = 128  # px; a multiple of the largest stride (128 covers strides up to 64, cheaply)


def load_cfg(cfg: str | Path | dict[str, Any]) -> tuple[dict[str, Any], str]:
    """(model dict deep-copied, source name for messages) from a YAML path or a dict."""
    if isinstance(cfg, dict):
        return copy.deepcopy(cfg), str(cfg.get("yaml_file", "<dict>"))
    path = Path(cfg)
    if not path.is_file():
        raise MissingFileError(f"model config not found: {path}")
    try:
        d = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ModelConfigError(yaml_error(path, e)) from None
    if not isinstance(d, dict):
        raise ModelConfigError(f"{path}: a model YAML must be a mapping with backbone/head keys")
    d["yaml_file"] = path.name
    return d, str(path)


def row_input(m: nn.Module, x: Any, y: dict[int, Any]) -> Any:
    """What row `m` takes: the previous row's output `x` (from -1), or saved outputs `y[j]` (a list for
    several froms, -1 standing for `x`)."""
    if m.f == -1:
        return x
    return y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]


class Model(nn.Module):
    """YAML-built network (see docs/CONTRACTS.md, "Model").

    `forward(x)`: x float32 [B, ch, H, W], 0..1, H and W multiples of `stride.max()`.
    Detector: list of raw maps, level i [B, na, H/stride_i, W/stride_i, 5 + nc].
    Classifier (last row `Classify`): logits [B, nc].
    Attributes: `yaml` (resolved dict), `names`, `stride` [nl] float (probed), `layers`, `save`,
    `detect` (the Detect module or None).
    """

    def __init__(self, cfg: str | Path | dict[str, Any], ch: int = 3, nc: int | None = None) -> None:
        super().__init__()
        self.yaml, self.source = load_cfg(cfg)
        if nc is not None:
            self.yaml["nc"] = int(nc)
        ch = int(self.yaml.setdefault("ch", ch))  # a stored cfg (checkpoint) keeps its input channels
        self.layers, self.save, self.channels = parse_model(self.yaml, ch, self.source)
        nc_model = self.yaml.get("nc")
        self.names: list[str] = [str(i) for i in range(int(nc_model))] if isinstance(nc_model, int) else []
        self.register_buffer("stride", self._probe_strides(ch), persistent=False)
        if self.detect is not None:
            self.detect.stride.copy_(self.stride)
            self.detect.initialize_biases()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor] | torch.Tensor:
        return self._run(x)[0]

    def _run(self, x: torch.Tensor, keep: set[int] | frozenset[int] = frozenset(),
             check: bool = False) -> tuple[Any, dict[int, torch.Tensor]]:
        """Forward through the rows; returns (last output, {row: output} for rows in `keep`).

        With `check`, a failing row raises ModelConfigError naming it (used when probing).
        """
        y: dict[int, Any] = {}
        kept: dict[int, torch.Tensor] = {}
        for m in self.layers:
            x = row_input(m, x, y)
            if check:
                try:
                    x = m(x)
                except (RuntimeError, ValueError) as e:
                    shapes = [tuple(t.shape) for t in x] if isinstance(x, list) else tuple(x.shape)
                    raise ModelConfigError(f"{self.source}: row {m.i} [{m.f}, {m.n}, {m.type}, "
                                           f"{m.args}] fails on inputs {shapes}: {e}") from e
            else:
                x = m(x)
            if m.i in self.save:
                y[m.i] = x
            if m.i in keep:
                kept[m.i] = x
        return x, kept

    def tap(self, x: torch.Tensor, rows: list[int]) -> list[torch.Tensor]:
        """Outputs of the given rows (e.g. backbone features), in the order asked."""
        _, kept = self._run(x, keep=set(rows))
        return [kept[r] for r in rows]

    @torch.no_grad()
    def _probe_strides(self, ch: int) -> torch.Tensor:
        """Strides from one eval forward at PROBE_SIZE: per Detect input, else of Classify's input."""
        training = self.training
        self.eval()
        try:
            if self.detect is not None:
                rows = list(self.layers[-1].f) if isinstance(self.layers[-1].f, list) else [self.layers[-1].f]
            else:
                rows = [self.layers[-1].f if len(self.layers) > 1 else -1]
            rows = [len(self.layers) - 2 if r == -1 else r for r in rows]
            _, kept = self._run(torch.zeros(1, ch, PROBE_SIZE, PROBE_SIZE), keep=set(rows), check=True)
        finally:
            self.train(training)
        if any(r < 0 for r in rows):
            return torch.tensor([1.0])
        return torch.tensor([PROBE_SIZE / kept[r].shape[-2] for r in rows], dtype=torch.float32)

    def fuse(self) -> Model:
        """Fold every conv+BN pair in place (inference only); returns self."""
        for m in self.modules():
            if isinstance(m, ConvBNAct):
                m.fuse()
        return self

    @property
    def detect(self) -> Detect | None:
        """The Detect head (last row), or None for classifiers. A property, so that the head is not
        registered twice (which would duplicate its tensors in state_dict)."""
        last = self.layers[-1]
        return last if isinstance(last, Detect) else None

    @property
    def is_classifier(self) -> bool:
        return isinstance(self.layers[-1], Classify)

    def info(self, imgsz: int | None = 320, verbose: bool = True) -> str:
        """Print (and return) the per-row table and the summary line (GFLOPs at `imgsz`)."""
        name = Path(self.source).stem if self.source != "<dict>" else "Model"
        text = summary_line(self, name, len(self.layers), imgsz)
        if verbose:
            text = summary_table(self.layers) + "\n" + text
        print(text)
        return text


def run(cfg: str | Path, imgsz: int = 320, nc: int | None = None) -> Model:
    """Build `cfg` and print its summary at `imgsz`; returns the model."""
    model = Model(cfg, nc=nc)
    model.info(imgsz)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build a model YAML and print its per-row summary.")
    parser.add_argument("--cfg", default="models/yolov5s.yaml", help="model YAML")
    parser.add_argument("--imgsz", type=int, default=320, help="image size for GFLOPs (px)")
    parser.add_argument("--nc", type=int, default=None, help="override the number of classes")
    args = parser.parse_args(argv)
    run(args.cfg, args.imgsz, args.nc)  # a ModelConfigError/MissingFileError is printed by cli_main


if __name__ == "__main__":
    sys.exit(cli_main("yolo.py", main))
