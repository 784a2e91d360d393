"""ModelEMA: decay ramp, averaging of float entries, copying of integer buffers, state round trip."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from utils.train.ema import ModelEMA, de_parallel


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


def test_ema_is_frozen_copy_in_eval_mode():
    m = _net()
    ema = ModelEMA(m)
    assert ema.ema is not m
    assert not ema.ema.training
    assert all(not p.requires_grad for p in ema.ema.parameters())
    for a, b in zip(ema.ema.parameters(), m.parameters()):
        assert torch.equal(a, b)


def test_ema_update_follows_decay_formula():
    m = _net()
    ema = ModelEMA(m, decay=0.9, tau=1.0)
    w0 = m[0].weight.detach().clone()
    with torch.no_grad():
        m[0].weight.add_(1.0)
    ema.update(m)
    d = 0.9 * (1 - math.exp(-1.0))
    expected = d * w0 + (1 - d) * (w0 + 1.0)
    assert torch.allclose(ema.ema[0].weight, expected, atol=1e-6)
    assert ema.updates == 1


def test_ema_copies_integer_buffers_and_averages_bn_stats():
    m = _net()
    ema = ModelEMA(m, decay=0.5, tau=1e-9)  # d == 0.5 from the first step
    m.train()
    m(torch.randn(2, 3, 8, 8))  # moves BN running stats, bumps num_batches_tracked
    ema.update(m)
    assert int(ema.ema[1].num_batches_tracked) == 1
    expected = 0.5 * torch.zeros(4) + 0.5 * m[1].running_mean
    assert torch.allclose(ema.ema[1].running_mean, expected, atol=1e-6)


def test_ema_early_updates_track_model_closely():
    m = _net()
    ema = ModelEMA(m)  # default decay 0.9999, tau 2000: the first update barely averages
    with torch.no_grad():
        m[0].weight.mul_(2)
    ema.update(m)
    assert torch.allclose(ema.ema[0].weight, m[0].weight, rtol=1e-3)


def test_ema_state_dict_round_trip_and_updates():
    m = _net()
    ema = ModelEMA(m)
    for _ in range(3):
        ema.update(m)
    e2 = ModelEMA(_net())
    e2.load_state_dict(ema.state_dict(), updates=ema.updates)
    assert e2.updates == 3
    for k, v in ema.state_dict().items():
        assert torch.equal(v, e2.state_dict()[k])


def test_ema_bad_input():
    with pytest.raises(ValueError, match="decay"):
        ModelEMA(_net(), decay=1.0)
    with pytest.raises(ValueError, match="tau"):
        ModelEMA(_net(), tau=0)
    ema = ModelEMA(_net())
    with pytest.raises(KeyError, match="no entry"):
        ema.update(nn.Sequential(nn.Conv2d(3, 4, 3)))
    with pytest.raises(RuntimeError):
        ema.load_state_dict({"0.weight": torch.zeros(1)})


def test_de_parallel_unwraps_dataparallel():
    m = _net()
    assert de_parallel(nn.DataParallel(m)) is m
    assert de_parallel(m) is m


def test_ema_moves_aliased_modules_once():
    class Aliased(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Conv2d(3, 2, 1)])
            self.head = self.layers[0]  # same module under a second name, as Model.detect is

    m = Aliased()
    ema = ModelEMA(m, decay=0.5, tau=1e-9)
    w0 = m.head.weight.detach().clone()
    with torch.no_grad():
        m.head.weight.add_(2.0)
    ema.update(m)
    assert torch.allclose(ema.ema.head.weight, w0 + 1.0)  # one step of d = 0.5, not two


def _reference_ema(ema_sd: dict, src_sd: dict, d: float) -> dict:
    """The EMA formula entry by entry, as a plain loop (what ModelEMA.update's foreach ops replace)."""
    return {k: (d * v + (1 - d) * src_sd[k]) if v.dtype.is_floating_point else src_sd[k].clone()
            for k, v in ema_sd.items()}


def test_ema_follows_reassigned_tensors_between_updates():
    m = _net()
    ema = ModelEMA(m, decay=0.5, tau=1e-9)  # d == 0.5
    m.train()
    for step in range(4):
        m(torch.randn(2, 3, 8, 8))
        with torch.no_grad():
            m[0].weight.add_(0.1)  # in place, as the optimizer does: the cached lists see it
        if step == 1:
            m[1].running_mean = torch.full((4,), 3.0)  # a swapped buffer object
        if step == 2:
            m[3].weight.data = torch.ones_like(m[3].weight)  # same Parameter, new storage
        want = _reference_ema({k: v.clone() for k, v in ema.state_dict().items()}, m.state_dict(), 0.5)
        ema.update(m)
        for k, v in ema.state_dict().items():
            torch.testing.assert_close(v, want[k], rtol=1e-6, atol=1e-6, msg=f"step {step}: {k}")
    # the swapped running_mean pulled the EMA towards 3.0; a stale cache would have kept the old tensor
    assert (ema.ema[1].running_mean > 1.0).all()
    other = _net()  # a different model object with the same entries: its own tensors are used
    with torch.no_grad():
        for p in other.parameters():
            p.fill_(7.0)
    ema.update(other)
    assert (ema.ema[0].weight > 3.0).all()
