"""Tests for utils/train/autoanchor.py: BPR check, k-means + evolution re-fit, dataset wrapper."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import utils.train.autoanchor as aa
from utils.train.autoanchor import anchor_metrics, autoanchor, check_anchors, dataset_wh, kmeans_log

CENTRES = np.array([[8, 8], [20, 40], [40, 20], [60, 60], [100, 50], [50, 100],
                    [150, 150], [250, 120], [120, 250]], dtype=np.float64)


def _synthetic_wh(n: int = 1500, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return CENTRES[rng.integers(len(CENTRES), size=n)] * rng.uniform(0.7, 1.3, (n, 2))


def test_good_anchors_are_kept():
    good = CENTRES[np.argsort(CENTRES.prod(1))].reshape(3, 3, 2)
    new, report = check_anchors(_synthetic_wh(), good, thr=4.0)
    assert new is None
    assert 'kept' in report and 'recall 1.0000' in report and '\n' not in report


def test_bad_anchors_are_refit_to_high_recall():
    wh = _synthetic_wh()
    bad = torch.full((3, 3, 2), 300.0)
    bpr_before = anchor_metrics(wh, bad.reshape(-1, 2).numpy(), 4.0)[0]
    assert bpr_before < 0.5
    new, report = check_anchors(wh, bad, thr=4.0, seed=0)
    assert isinstance(new, torch.Tensor) and new.shape == bad.shape and new.dtype == bad.dtype
    flat = new.reshape(-1, 2).numpy().astype(np.float64)
    assert anchor_metrics(wh, flat, 4.0)[0] >= 0.98
    area = flat.prod(1)
    assert np.all(np.diff(area) >= 0)  # small anchors first -> finest level
    assert 'applied' in report
    # seeded: the same call gives the same anchors
    again, _ = check_anchors(wh, bad, thr=4.0, seed=0)
    assert torch.equal(new, again)


def test_refit_is_discarded_when_not_better(monkeypatch):
    wh = _synthetic_wh(300)
    bad = np.full((3, 3, 2), 300.0)
    monkeypatch.setattr(aa, 'fit_anchors', lambda *a, **k: np.full((9, 2), 5000.0))
    new, report = check_anchors(wh, bad)
    assert new is None and 'not better' in report


def test_too_few_or_no_labels():
    bad = np.full((3, 3, 2), 300.0)
    new, report = check_anchors(np.array([[5.0, 5.0], [6.0, 7.0]]), bad)
    assert new is None and 'too few' in report
    new, report = check_anchors(np.zeros((4, 2)), bad)  # zero-size labels are ignored
    assert new is None and 'no labels' in report


def test_kmeans_finds_separated_clusters():
    rng = np.random.default_rng(0)
    centres = np.array([[4.0, 4.0], [40.0, 10.0], [200.0, 200.0]])
    wh = centres[rng.integers(3, size=600)] * rng.uniform(0.95, 1.05, (600, 2))
    found = kmeans_log(wh, 3, np.random.default_rng(0))
    found = found[np.argsort(found.prod(1))]
    assert np.allclose(found, centres, rtol=0.05)


def test_bad_input_is_named():
    good = np.full((3, 3, 2), 10.0)
    with pytest.raises(ValueError, match=r'wh must be \[n, 2\]'):
        check_anchors(np.ones((5, 3)), good)
    with pytest.raises(ValueError, match=r'anchors must be \[nl, na, 2\]'):
        check_anchors(np.ones((5, 2)), good.reshape(9, 2))
    with pytest.raises(ValueError, match='row 2'):
        check_anchors(np.array([[1.0, 1.0], [2.0, 2.0], [np.nan, 3.0]]), good)
    with pytest.raises(ValueError, match='thr'):
        check_anchors(np.ones((5, 2)), good, thr=1.0)
    with pytest.raises(ValueError, match='img_7.jpg'):
        dataset_wh([np.zeros((1, 5)), np.zeros((2, 4))], np.array([[64, 64], [64, 64]]), 64,
                   files=['img_3.jpg', 'img_7.jpg'])
    with pytest.raises(ValueError, match='image shapes'):
        dataset_wh([np.zeros((1, 5))], np.zeros((2, 2)), 64)


def test_dataset_wh_scales_to_imgsz():
    labels = [np.array([[0, 0.5, 0.5, 0.5, 0.5]]), np.zeros((0, 5)), np.array([[1, 0.5, 0.5, 0.25, 1.0]])]
    shapes = np.array([[640, 480], [100, 100], [200, 400]])  # (w, h)
    wh = dataset_wh(labels, shapes, 320)
    assert np.allclose(wh, [[160.0, 120.0], [40.0, 320.0]])


def test_autoanchor_on_dataset_follows_stride_order(capsys):
    rng = np.random.default_rng(2)
    wh = _synthetic_wh(900, seed=3)  # pixels at 320 on 640 x 480 images (scale 0.5)
    labels, per = [], 30
    for i in range(0, len(wh), per):
        chunk = wh[i:i + per] / 0.5 / np.array([640, 480])
        xy = rng.uniform(0.3, 0.7, (len(chunk), 2))
        labels.append(np.column_stack([np.zeros(len(chunk)), xy, chunk]).astype(np.float32))
    ds = SimpleNamespace(labels=labels, shapes=np.tile([640, 480], (len(labels), 1)),
                         im_files=[f'{i}.jpg' for i in range(len(labels))])
    strides = torch.tensor([32.0, 16.0, 8.0])  # coarsest first on purpose
    new, report = autoanchor(ds, torch.full((3, 3, 2), 300.0), strides, imgsz=320, thr=4.0)
    assert new is not None and new.shape == (3, 3, 2)
    assert report in capsys.readouterr().out
    area = new.prod(-1)
    assert area[2].max() <= area[1].min() and area[1].max() <= area[0].min()  # stride 8 gets the smallest
    assert anchor_metrics(wh, new.reshape(-1, 2).double().numpy(), 4.0)[0] >= 0.98
    with pytest.raises(ValueError, match='strides'):
        autoanchor(ds, torch.full((3, 3, 2), 300.0), torch.tensor([8.0, 16.0]), imgsz=320)


def test_bpr_agrees_with_loss_matching():
    """A label AutoAnchor counts as recallable is matched by ComputeLoss, and vice versa."""
    from utils.train.loss import ComputeLoss

    # px at 320, plus slivers no anchor fits and two sizes near the 4x ratio limit of the 8 x 8 anchor
    wh = np.concatenate([_synthetic_wh(100, seed=4), [[2.0, 60.0], [300.0, 3.0], [1.0, 1.0]],
                         [[8 * 4 * 0.999, 8.0], [8 * 4 * 1.001, 8.0]]])
    anchors = torch.tensor(CENTRES[np.argsort(CENTRES.prod(1))].reshape(3, 3, 2), dtype=torch.float32)
    x = aa._best_ratio(wh, anchors.reshape(-1, 2).double().numpy()).max(1)
    fits = x > 1 / 4.0
    assert 0 < fits.sum() < len(wh)  # the case has both kinds of label
    hyp = {'box': 0.05, 'obj': 1.0, 'cls': 0.5, 'cls_pw': 1.0, 'obj_pw': 1.0, 'anchor_t': 4.0}
    loss_fn = ComputeLoss(anchors, torch.tensor([8.0, 16.0, 32.0]), 1, hyp)
    n = len(wh)  # one image per label, so the matched image index names the label
    maps = [torch.zeros(1).expand(n, 3, 320 // s, 320 // s, 6) for s in (8, 16, 32)]
    targets = torch.tensor(np.column_stack([np.arange(n), np.zeros(n), np.full((n, 2), 0.5), wh / 320]),
                           dtype=torch.float32)
    matched = torch.zeros(n, dtype=torch.bool)
    for lt in loss_fn.build_targets(maps, targets):
        matched[lt.b] = True
    assert matched.numpy().tolist() == fits.tolist()
