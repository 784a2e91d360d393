"""accelerate() / decelerate() (utils/accel/swap.py): what is swapped, what is kept, how it is switched off,
and that an accelerated model trains like the plain one and saves like it."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from models.common import ConvBNAct
from models.mobilenetv3 import SELayer
from models.yolo import Model
from tests.accel.helpers import needs_cc
from utils.accel import accelerate, decelerate, is_accelerated, train_kernels
from utils.train.ema import ModelEMA

CL = torch.channels_last
SMALL = "models/mobilenetv3-small-yolo.yaml"


def _model(cfg=SMALL, seed=0):
    torch.manual_seed(seed)
    return Model(cfg, nc=3).train().to(memory_format=CL)


def _expected(model):
    """How many modules accelerate() should take, counted from the rules, not from its code."""
    n = 0
    for m in model.modules():
        if isinstance(m, SELayer):
            n += 1
        elif isinstance(m, ConvBNAct) and type(m.bn) is nn.BatchNorm2d:
            dw = m.conv.groups == m.conv.in_channels > 1 and m.conv.kernel_size[0] >= 5
            n += type(m.act) in (nn.ReLU, nn.Hardswish, nn.Identity) or dw
    return n


def _ops_ran(fn):
    with torch.profiler.profile() as prof:
        fn()
    return {e.key for e in prof.key_averages() if e.key.startswith("mobileyolo::")}


@needs_cc
def test_swaps_eligible_modules_and_keeps_everything_else():
    m = _model()
    before = m.state_dict(keep_vars=True)
    rows = [(r.i, r.f, r.type, r.np, type(r)) for r in m.layers]
    lines = []
    n = accelerate(m, log=lines.append)
    assert n == _expected(m) > 40 and len(lines) == 1 and f"{n} modules accelerated" in lines[0]
    after = m.state_dict(keep_vars=True)
    assert list(after) == list(before) and all(after[k] is before[k] for k in before)  # the same tensors
    assert [(r.i, r.f, r.type, r.np) for r in m.layers] == [r[:4] for r in rows]
    for r, (*_, cls) in zip(m.layers, rows):
        assert isinstance(r, cls)
    swapped = [x for x in m.modules() if is_accelerated(x)]
    assert all(isinstance(x, x.plain_class) and type(x).__name__ == f"Accelerated{x.plain_class.__name__}"
               for x in swapped)
    assert accelerate(m, log=lines.append) == n  # again: nothing swapped twice
    assert not any(type(x).__name__.startswith("AcceleratedAccelerated") for x in m.modules())
    assert decelerate(m) == n and not any(is_accelerated(x) for x in m.modules())
    assert list(m.state_dict()) == list(before)


@needs_cc
def test_train_mode_output_and_gradients_match_plain_eval_is_plain():
    a, b = _model(), _model()
    b.load_state_dict(a.state_dict())
    accelerate(a)
    x = torch.rand(2, 3, 64, 64).contiguous(memory_format=CL)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya: list = []
    assert {"mobileyolo::bn_act_forward", "mobileyolo::se_forward", "mobileyolo::dw_conv2d"} <= \
        _ops_ran(lambda: ya.extend(a(xa)))
    yb = b(xb)
    for u, v in zip(ya, yb):
        assert torch.allclose(u, v, rtol=1e-4, atol=1e-4)
    sum((u * u).mean() for u in ya).backward()
    sum((v * v).mean() for v in yb).backward()
    assert ((xa.grad - xb.grad).abs().max() / xb.grad.abs().max()).item() < 1e-3  # float32 rounding only
    scale = max(p.grad.abs().max().item() for p in b.parameters())
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert (pa.grad - pb.grad).abs().max().item() <= 1e-3 * max(pb.grad.abs().max().item(), 1e-3 * scale), name
    a.eval(), b.eval()
    b.load_state_dict(a.state_dict())  # running statistics equal to float rounding only: made identical
    with torch.no_grad():
        out: list = []
        assert _ops_ran(lambda: out.append(a(x))) == set()  # eval: plain PyTorch, the same numbers
        assert torch.equal(out[0][0], b(x)[0])


@needs_cc
def test_copies_and_checkpoints_are_plain(tmp_path):
    m = _model()
    n = accelerate(m)
    assert n > 0
    ema = ModelEMA(m)  # deep-copies the model: plain modules, eval mode
    assert not any(is_accelerated(x) for x in ema.ema.modules())
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    plain = Model(SMALL, nc=3)
    buf.seek(0)
    plain.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    pickled = pickle.loads(pickle.dumps(m))
    assert not any(is_accelerated(x) for x in pickled.modules())
    assert sum(is_accelerated(x) for x in m.modules()) == n  # the original is untouched
    c = copy.deepcopy(m)
    assert type(c.layers[0]) is type(plain.layers[0]) and c.layers[0].type == "conv_bn_hswish"
    for k, v in c.state_dict().items():
        assert torch.equal(v, m.state_dict()[k]), k


@needs_cc
def test_off_by_flag_and_by_environment(monkeypatch):
    m = _model()
    lines: list[str] = []
    assert accelerate(m, enabled=False, log=lines.append) == 0
    monkeypatch.setenv("MOBILEYOLO_CPU_KERNELS", "0")
    assert accelerate(m, log=lines.append) == 0
    assert accelerate(m, enabled=True, log=lines.append) == 0  # the environment switch wins
    assert not any(is_accelerated(x) for x in m.modules())
    assert "--no-accel" in lines[0] and all("MOBILEYOLO_CPU_KERNELS=0" in ln for ln in lines[1:]) and len(lines) == 3
    monkeypatch.delenv("MOBILEYOLO_CPU_KERNELS")
    assert accelerate(m, log=lines.append) > 0


def test_a_model_off_the_cpu_is_left_alone():
    m = Model(SMALL, nc=3).to("meta")
    lines: list[str] = []
    assert accelerate(m, log=lines.append) == 0 and "CPU-only" in lines[0] and "meta" in lines[0]


@needs_cc
def test_a_model_without_eligible_modules_says_so():
    m = _model("models/yolov5n.yaml")  # SiLU and 3x3 convs only: nothing the kernels compute
    lines: list[str] = []
    assert accelerate(m, log=lines.append) == 0 == _expected(m)
    assert "none of this model's modules" in lines[0]


@needs_cc
def test_frozen_and_changed_modules_fall_back_per_call():
    """Eligibility is checked at each call: a module whose BatchNorm was swapped or folded after
    accelerate() runs its plain forward."""
    m = ConvBNAct(8, 8, 3, 1, act=nn.Hardswish()).train().to(memory_format=CL)
    assert accelerate(m) == 1 and is_accelerated(m)
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=CL)
    assert _ops_ran(lambda: m(x)) == {"mobileyolo::bn_act_forward"}
    m.fuse()
    assert _ops_ran(lambda: m(x)) == set() and train_kernels.conv_bn_act(m, x) is None


def test_train_py_flag_and_config_field():
    import train
    from utils.train.config import TrainConfig

    assert train.parse_opt([]).accel is True and train.parse_opt(["--no-accel"]).accel is False
    assert TrainConfig.from_dict({"epochs": 2}).accel is True  # args of runs from before the flag
    assert TrainConfig(accel=False).to_dict()["accel"] is False


@pytest.mark.slow
@needs_cc
def test_train_run_applies_it_once_and_no_accel_turns_it_off(tmp_path, capsys):
    """train.run() on tiny data with an SE + hard-swish model: one line says how many modules; --no-accel
    says off; both runs finish and write plain checkpoints."""
    import yaml

    import train
    from models.checkpoint import model_from_checkpoint
    from utils.data.synthetic import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "ds", n_train=4, n_val=2, imgsz=64, seed=1)
    cfg = tmp_path / "se.yaml"
    cfg.write_text(yaml.safe_dump({
        "nc": 2, "depth_multiple": 1.0, "width_multiple": 1.0,
        "anchors": [[8, 8, 14, 14, 20, 20], [24, 24, 34, 34, 48, 48]],
        "backbone": [[-1, 1, "conv_bn_hswish", [16, 2]], [-1, 1, "MobileNetV3_InvertedResidual", [24, 48, 5, 2, 1, 1]],
                     [-1, 1, "MobileNetV3_InvertedResidual", [32, 64, 5, 2, 1, 1]],
                     [-1, 1, "MobileNetV3_InvertedResidual", [48, 96, 3, 2, 1, 1]]],
        "head": [[[2, 3], 1, "Detect", ["nc", "anchors"]]]}))
    common = dict(data=str(data), cfg=str(cfg), imgsz=64, batch_size=2, epochs=1, workers=0, noplots=True,
                  noautoanchor=True, project=str(tmp_path / "runs"), hyp_overrides={"nbs": 2})
    out = train.run(**common)
    text = capsys.readouterr().out
    expected = _expected(Model(str(cfg), nc=2))
    assert text.count("CPU training kernels:") == 1 and f"{expected} modules accelerated" in text
    assert not any(is_accelerated(x) for x in model_from_checkpoint(out["last"]).modules())
    train.run(**common, accel=False)
    text = capsys.readouterr().out
    assert text.count("CPU training kernels:") == 1 and "off" in text and "--no-accel" in text

