"""ImageNet weights for the MobileNetV3 rows: map a torchvision MobileNetV3 state_dict onto a Model.

torchvision's `features[k]` is matched, in order, to our k-th MobileNetV3 row (`conv_bn_hswish` or
`MobileNetV3_InvertedResidual`); inside a pair tensors are matched in registration order (our blocks
register expand, depthwise, SE, project like torchvision), and every shape must agree. Matching stops
at the first row that disagrees; the rest is reported as skipped. A `Classify` last row also takes
torchvision's classifier (its first Linear becomes our 1x1 conv) when the shapes agree.
No downloads happen unless you pass a torchvision weights enum (or its name) yourself.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.checkpoint import CheckpointError, torch_load_reason
from models.mobilenetv3 import Classify, MobileNetV3_InvertedResidual, conv_bn_hswish
from utils.core.errors import MissingFileError

MNV3_TYPES = (conv_bn_hswish, MobileNetV3_InvertedResidual)


@dataclass
class LoadReport:
    """What `load_torchvision_backbone` did. Keys are our state_dict keys / torchvision's keys."""

    loaded: list[str] = field(default_factory=list)          # our keys that received a tensor
    skipped: list[str] = field(default_factory=list)         # torchvision keys left unused
    rows: list[tuple[int, str]] = field(default_factory=list)  # (our row index, torchvision prefix)
    reasons: list[str] = field(default_factory=list)         # why matching stopped, if it did

    def __str__(self) -> str:
        text = (f"torchvision weights: loaded {len(self.loaded)} tensors into {len(self.rows)} rows, "
                f"skipped {len(self.skipped)} torchvision tensors")
        return text + "".join(f"\n  {r}" for r in self.reasons)


def read_state_dict(weights: Any) -> dict[str, torch.Tensor]:
    """A state_dict from a dict, a local .pth/.pt path, a torchvision WeightsEnum or its name.

    Only the enum (or a name like "MobileNet_V3_Large_Weights.IMAGENET1K_V1") may download.
    """
    if isinstance(weights, dict):
        sd = weights
    elif isinstance(weights, (str, Path)) and Path(weights).is_file():
        try:
            sd = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError for unsafe content, RuntimeError/EOFError for bad files
            raise CheckpointError(f"{weights}: not a loadable state_dict ({torch_load_reason(e)})") from None
    elif isinstance(weights, (str, Path)) and re.fullmatch(r"MobileNet_V3_\w+_Weights\.\w+", str(weights)):
        from torchvision.models import get_weight  # online path: never used by the tests
        sd = get_weight(str(weights)).get_state_dict(progress=True)
    elif hasattr(weights, "get_state_dict"):
        sd = weights.get_state_dict(progress=True)
    else:
        raise MissingFileError(f"torchvision weights not found: {weights!r} (give a local .pth file, a "
                               f"state_dict, or a torchvision MobileNet_V3_*_Weights enum)")
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not any(str(k).startswith("features.") for k in sd):
        raise CheckpointError(f"{weights if isinstance(weights, (str, Path)) else 'state_dict'}: not a "
                              f"torchvision MobileNetV3 state_dict (no 'features.*' keys)")
    return sd


def _groups(sd: dict[str, torch.Tensor]) -> OrderedDict[str, list[tuple[str, torch.Tensor]]]:
    """torchvision keys grouped by 'features.k.' prefix, in k order (other keys grouped by name)."""
    groups: OrderedDict[str, list[tuple[str, torch.Tensor]]] = OrderedDict()
    def order(k: str) -> tuple[int, int]:
        m = re.match(r"features\.(\d+)\.", k)
        return (0, int(m.group(1))) if m else (1, 0)
    for k in sorted(sd, key=order):  # stable: keeps registration order inside a block
        m = re.match(r"(features\.\d+\.)", k)
        groups.setdefault(m.group(1) if m else k, []).append((k, sd[k]))
    return groups


def _mnv3_rows(model: nn.Module) -> list[tuple[int, str, nn.Module]]:
    """(row index, state_dict prefix, block) for every MobileNetV3 block, in row order."""
    out = []
    for layer in model.layers:
        subs = [(f"layers.{layer.i}.", layer)] if isinstance(layer, MNV3_TYPES) else [
            (f"layers.{layer.i}.{n}.", c) for n, c in layer.named_children() if isinstance(c, MNV3_TYPES)]
        out += [(layer.i, p, m) for p, m in subs]
    return out


@torch.no_grad()
def load_torchvision_backbone(model: nn.Module, weights: Any) -> LoadReport:
    """Copy torchvision MobileNetV3 weights into `model`'s MobileNetV3 rows (and Classify); report.

    `model`: an unfused `models.yolo.Model`. `weights`: state_dict, local .pth path, or enum (online).
    """
    sd = read_state_dict(weights)
    groups = _groups(sd)
    feats = [g for g in groups if g.startswith("features.")]
    ours = model.state_dict()
    report = LoadReport()
    used: set[str] = set()
    for k, (row, prefix, block) in enumerate(_mnv3_rows(model)):
        if k >= len(feats):
            report.reasons.append(f"row {row}: torchvision has only {len(feats)} feature blocks")
            break
        theirs = groups[feats[k]]
        mine = [(prefix + n, t) for n, t in block.state_dict().items()]
        if len(mine) != len(theirs) or any(a.shape != b.shape for (_, a), (_, b) in zip(mine, theirs)):
            report.reasons.append(f"row {row} ({type(block).__name__}) does not match {feats[k]}* "
                                  f"(tensor count/shapes differ; fused model or other layout?): stopped")
            break
        for (name, _), (tk, t) in zip(mine, theirs):
            ours[name].copy_(t)
            report.loaded.append(name)
            used.add(tk)
        report.rows.append((row, feats[k]))
    _load_classifier(model, sd, ours, report, used)
    report.skipped = [k for k in sd if k not in used]
    return report


def _load_classifier(model: nn.Module, sd: dict[str, torch.Tensor], ours: dict[str, torch.Tensor],
                     report: LoadReport, used: set[str]) -> None:
    """torchvision classifier.0 (Linear) -> Classify.conv (1x1), classifier.3 -> Classify.linear."""
    head = model.layers[-1]
    if not isinstance(head, Classify) or "classifier.0.weight" not in sd:
        return
    i = head.i
    pairs = [(f"layers.{i}.conv.weight", "classifier.0.weight"), (f"layers.{i}.conv.bias", "classifier.0.bias"),
             (f"layers.{i}.linear.weight", "classifier.3.weight"), (f"layers.{i}.linear.bias", "classifier.3.bias")]
    if any(tk not in sd or ours[k].numel() != sd[tk].numel() for k, tk in pairs):
        report.reasons.append(f"row {i} (Classify): classifier shapes differ (nc?): not loaded")
        return
    for k, tk in pairs:
        ours[k].copy_(sd[tk].view_as(ours[k]))
        report.loaded.append(k)
        used.add(tk)
    report.rows.append((i, "classifier."))
