"""Optimizer groups, LR schedules, warm-up, accumulation and freezing."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from utils.train.optim import (accumulate_steps, apply_warmup, build_optimizer, build_scheduler, freeze_layers,
                               lr_lambda, scaled_weight_decay, set_bn_momentum, split_param_groups, warmup_iters)

HYP = {"lr0": 0.01, "lrf": 0.01, "momentum": 0.937, "warmup_momentum": 0.8, "warmup_bias_lr": 0.1}


class Rows(nn.Module):
    """Stand-in with YAML-row naming (`layers.<i>.`), like models.yolo.Model."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)),
                                     nn.Conv2d(4, 4, 1), nn.Sequential(nn.GroupNorm(2, 4), nn.Linear(4, 2))])


def test_three_groups_and_weight_decay_only_on_weights():
    m = Rows()
    g = split_param_groups(m)
    assert len(g["weights"]) == 3  # conv0.weight, conv1.weight, linear.weight
    assert len(g["norm"]) == 2  # BN weight, GroupNorm weight
    assert len(g["bias"]) == 4  # BN, conv1, GroupNorm, linear biases
    for name in ("SGD", "Adam", "AdamW"):
        opt = build_optimizer(m, name, lr=0.01, momentum=0.9, weight_decay=5e-4)
        by = {pg["name"]: pg for pg in opt.param_groups}
        assert [pg["name"] for pg in opt.param_groups] == ["norm", "weights", "bias"]
        assert by["weights"]["weight_decay"] == 5e-4
        assert by["norm"]["weight_decay"] == 0 and by["bias"]["weight_decay"] == 0
        assert sum(len(pg["params"]) for pg in opt.param_groups) == 9
    sgd = build_optimizer(m, "SGD", momentum=0.9)
    assert sgd.param_groups[0]["nesterov"] is True
    adam = build_optimizer(m, "Adam", momentum=0.9)
    assert adam.param_groups[0]["betas"] == (0.9, 0.999)


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_fused_step_on_cpu_matches_the_loop(name):
    torch.manual_seed(0)
    a, b = Rows(), Rows()
    b.load_state_dict(a.state_dict())
    start = [p.detach().clone() for p in a.parameters()]
    opt_a = build_optimizer(a, name, lr=0.01, momentum=0.9, weight_decay=5e-4)
    assert all(pg["fused"] for pg in opt_a.param_groups)
    opt_b = build_optimizer(b, name, lr=0.01, momentum=0.9, weight_decay=5e-4)
    for pg in opt_b.param_groups:  # torch's per-tensor loop, the reference
        pg["fused"] = None
    for step in range(4):
        for m in (a, b):
            for k, p in enumerate(m.parameters()):
                p.grad = torch.sin(p.detach() * (step + 1) + k)
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    assert any((pa - p0).abs().max() > 1e-3 for pa, p0 in zip(a.parameters(), start))  # it did step
    assert all(s for s in opt_a.state.values())  # the fused step kept its state (momentum / moments)
    half = build_optimizer(nn.Linear(2, 2).half(), name)  # no norm layer: an empty first group is fine
    assert all(pg["fused"] is None for pg in half.param_groups)  # float16: torch's default step


def test_bad_optimizer_and_everything_frozen():
    with pytest.raises(ValueError, match="--optimizer"):
        build_optimizer(Rows(), "RMSprop")
    m = Rows()
    for p in m.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer(m)


@pytest.mark.parametrize("cos", [False, True])
def test_lr_lambda_endpoints_and_monotone(cos):
    f = lr_lambda(10, 0.01, cos)
    assert f(0) == pytest.approx(1.0)
    assert f(10) == pytest.approx(0.01)
    vals = [f(e) for e in range(11)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    if cos:
        assert f(5) == pytest.approx(0.505)
    else:
        assert f(5) == pytest.approx(1 - 0.5 * 0.99)
    with pytest.raises(ValueError):
        lr_lambda(0, 0.01)


def test_scheduler_resume_matches_uninterrupted():
    m = Rows()
    opt = build_optimizer(m, "SGD", lr=0.01)
    sched = build_scheduler(opt, 10, 0.01)
    for _ in range(4):
        opt.step()
        sched.step()
    lrs = [pg["lr"] for pg in opt.param_groups]
    opt2 = build_optimizer(m, "SGD", lr=0.01)
    opt2.load_state_dict(opt.state_dict())
    sched2 = build_scheduler(opt2, 10, 0.01, start_epoch=4)
    assert [pg["lr"] for pg in opt2.param_groups] == pytest.approx(lrs)
    assert lrs[0] == pytest.approx(0.01 * lr_lambda(10, 0.01)(4))
    opt.step(), sched.step(), opt2.step(), sched2.step()
    assert [pg["lr"] for pg in opt2.param_groups] == pytest.approx([pg["lr"] for pg in opt.param_groups])


def test_warmup_ramps_lr_and_momentum():
    opt = build_optimizer(Rows(), "SGD", lr=0.01, momentum=0.937)
    build_scheduler(opt, 10, 0.01)
    nw = 100
    apply_warmup(opt, 0, nw, 1.0, HYP)
    by = {pg["name"]: pg for pg in opt.param_groups}
    assert by["bias"]["lr"] == pytest.approx(0.1)
    assert by["weights"]["lr"] == pytest.approx(0.0)
    assert by["weights"]["momentum"] == pytest.approx(0.8)
    apply_warmup(opt, 50, nw, 1.0, HYP)
    assert by["weights"]["lr"] == pytest.approx(0.005)
    assert by["bias"]["lr"] == pytest.approx(0.055)
    assert by["norm"]["momentum"] == pytest.approx((0.8 + 0.937) / 2)
    apply_warmup(opt, 99, nw, 0.5, HYP)
    assert by["weights"]["lr"] == pytest.approx(0.99 * 0.005)
    apply_warmup(opt, 100, nw, 0.5, HYP)  # the end of the ramp lands exactly on the scheduled values
    assert by["weights"]["lr"] == pytest.approx(0.005) and by["bias"]["lr"] == pytest.approx(0.005)
    assert by["weights"]["momentum"] == pytest.approx(0.937)
    by["weights"]["lr"] = 123.0
    apply_warmup(opt, 101, nw, 1.0, HYP)  # past warm-up: untouched
    assert by["weights"]["lr"] == 123.0
    adam = build_optimizer(Rows(), "Adam", lr=0.001, momentum=0.937)
    build_scheduler(adam, 10, 0.01)
    apply_warmup(adam, 0, nw, 1.0, HYP)
    assert adam.param_groups[0]["betas"][0] == pytest.approx(0.8)


def test_warmup_iters_accumulate_and_decay():
    assert warmup_iters(3, 19) == 100
    assert warmup_iters(3, 50) == 150
    assert warmup_iters(0, 50) == 0
    assert accumulate_steps(16) == 4 and accumulate_steps(64) == 1 and accumulate_steps(128) == 1
    assert accumulate_steps(4, nbs=4) == 1
    assert scaled_weight_decay(5e-4, 16, 4) == pytest.approx(5e-4)
    assert scaled_weight_decay(5e-4, 128, 1) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="batch-size"):
        accumulate_steps(0)


def test_freeze_first_rows():
    m = Rows()
    names = freeze_layers(m, 2)
    assert names and all(n.startswith(("layers.0.", "layers.1.")) for n in names)
    assert all(not p.requires_grad for n, p in m.named_parameters() if n.startswith(("layers.0.", "layers.1.")))
    assert all(p.requires_grad for n, p in m.named_parameters() if n.startswith("layers.2."))
    assert len(split_param_groups(m)["weights"]) == 1
    with pytest.raises(ValueError, match="freeze"):
        freeze_layers(m, -1)
    assert not math.isnan(sum(p.sum().item() for p in m.parameters()))


def test_set_bn_momentum():
    m = Rows()
    assert set_bn_momentum(m, 0.1) == 1  # the BatchNorm only; GroupNorm has no running statistics
    assert m.layers[0][1].momentum == 0.1
    with pytest.raises(ValueError, match="bn_momentum"):
        set_bn_momentum(m, 0.0)
