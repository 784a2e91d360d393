"""Graph changes that keep ONNX Runtime's CPU kernels in their fast blocked (NCHWc) layout.

With `ORT_ENABLE_ALL` on an AVX2/AVX-512 CPU, ONNX Runtime rewrites Conv, pooling, Resize, Concat and
same-shape Add/Mul into a channel-blocked layout and inserts `ReorderInput`/`ReorderOutput` copies
wherever a node cannot run in it. Two spots in our graphs fell out of it (found with ORT's profiler and
its optimized-model dump):

- Squeeze-excite's `x * gate` broadcasts a `[B, C, 1, 1]` gate over `[B, C, H, W]`; ORT's blocked Mul
  needs equal shapes, so every SE block cost two ReorderOutputs, an NCHW Mul and a ReorderInput
  (9 blocks in MobileNetV3-Small).
  `static_se` makes the gate full-size with a nearest Resize, which ORT keeps blocked: exactly the
  same numbers, less latency (benchmarks/onnx_layout.py; figures in docs/PERFORMANCE.md).
  Only for fixed-size exports: the Resize scale is the map size at export time.
- `sigmoid_first` moves each head's Sigmoid in front of the head's Reshape/Transpose (an
  elementwise op commutes with both), so ORT fuses it into the head's Conv as an activation instead
  of running it as a separate pass over the permuted map.

`benchmarks/onnx_layout.py` times each pass against the plain export.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from models.mobilenetv3 import SELayer


class _StaticSE(nn.Module):
    """`SELayer` with the gate resized to the map's (fixed) size before the multiply; same weights."""

    def __init__(self, se: nn.Module) -> None:
        super().__init__()
        self.se = se

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.se.gate(F.adaptive_avg_pool2d(x, 1))
        # float() freezes the size into the graph: valid for a fixed-size export only (see static_se)
        return x * F.interpolate(g, scale_factor=(float(x.shape[2]), float(x.shape[3])), mode="nearest")


def static_se(wrapper: nn.Module) -> nn.Module:
    """A deep copy of `wrapper` whose `SELayer`s export the NCHWc-friendly form (fixed input size only).

    The original module is left untouched; outputs are identical (nearest resize of a 1x1 map is an
    exact broadcast).
    """
    out = copy.deepcopy(wrapper)
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, SELayer):
                setattr(parent, name, _StaticSE(child))
    return out


def sigmoid_first(model: onnx.ModelProto) -> int:  # noqa: F821 - onnx imported by the caller
    """Rewrite `X -> Reshape -> Transpose -> Sigmoid` chains to `X -> Sigmoid -> Reshape -> Transpose`
    in place, where the Reshape and Transpose outputs have no other consumer. Returns the count.

    Elementwise ops commute with reshapes and transposes, so the outputs are bit-identical.
    """
    nodes = list(model.graph.node)
    consumers: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in model.graph.output}
    moved: dict[int, object] = {}  # id(reshape node) -> its sigmoid, which must now come first
    for reshape in nodes:
        if reshape.op_type != "Reshape":
            continue
        nxt = consumers.get(reshape.output[0], [])
        if len(nxt) != 1 or nxt[0].op_type != "Transpose" or reshape.output[0] in graph_outputs:
            continue
        transpose = nxt[0]
        nxt = consumers.get(transpose.output[0], [])
        if len(nxt) != 1 or nxt[0].op_type != "Sigmoid" or transpose.output[0] in graph_outputs:
            continue
        sigmoid = nxt[0]
        x, y = reshape.input[0], sigmoid.output[0]
        # X -> Sigmoid(out = X_sig) -> Reshape -> Transpose(out = y); names stay unique
        sig_out = f"{x}_sigmoid_first"
        sigmoid.input[0], sigmoid.output[0] = x, sig_out
        reshape.input[0] = sig_out
        transpose.output[0] = y
        moved[id(reshape)] = sigmoid
    if moved:  # keep the node list topologically sorted: each Sigmoid now precedes its Reshape
        first = {id(s) for s in moved.values()}
        order = []
        for n in nodes:
            if id(n) in moved:
                order.append(moved[id(n)])
            if id(n) not in first:
                order.append(n)
        del model.graph.node[:]
        model.graph.node.extend(order)
    return len(moved)


# the passes export applies to the traced ONNX graph, in order
GRAPH_PASSES = {"sigmoid_first": sigmoid_first}
LAYOUT_PASSES = ("static_se", *GRAPH_PASSES)  # static_se changes the module before export (fixed size only)
