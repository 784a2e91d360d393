"""utils.ops.nms against a brute-force greedy NMS, plus thresholds, multi-label, filters and bad input."""
from __future__ import annotations

import pytest
import torch

from utils.ops.boxes import box_iou
from utils.ops.nms import non_max_suppression


def random_pred(seed, b=2, n=200, nc=3):
    """Decoded-style predictions with clustered boxes so that NMS has real work to do."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(b, 12, 2, generator=g) * 200
    idx = torch.randint(0, 12, (b, n), generator=g)
    xy = torch.gather(centres, 1, idx[..., None].expand(-1, -1, 2)) + torch.randn(b, n, 2, generator=g) * 6
    wh = 20 + torch.rand(b, n, 2, generator=g) * 30
    obj = torch.rand(b, n, 1, generator=g)
    cls = torch.rand(b, n, nc, generator=g)
    return torch.cat((xy, wh, obj, cls), -1)


def brute_force(x, conf_thres, iou_thres):
    """Best class per box, conf = obj * cls, then per class: keep the best, drop IoU > thres, repeat."""
    conf, j = (x[:, 5:] * x[:, 4:5]).max(1)
    xyxy = torch.cat((x[:, :2] - x[:, 2:4] / 2, x[:, :2] + x[:, 2:4] / 2), 1)
    kept = []
    for c in j.unique():
        rows = [i for i in torch.argsort(conf, descending=True).tolist() if j[i] == c and conf[i] > conf_thres]
        while rows:
            best, rows = rows[0], rows[1:]
            kept.append(torch.cat((xyxy[best], conf[best, None], c[None].float())))
            rows = [i for i in rows if box_iou(xyxy[best, None], xyxy[i, None])[0, 0] <= iou_thres]
    out = torch.stack(kept) if kept else torch.zeros(0, 6)
    return out[torch.argsort(out[:, 4], descending=True)]


@pytest.mark.parametrize("seed,conf,iou", [(0, 0.1, 0.45), (1, 0.3, 0.6), (2, 0.05, 0.3)])
def test_matches_brute_force(seed, conf, iou):
    pred = random_pred(seed)
    out = non_max_suppression(pred, conf_thres=conf, iou_thres=iou, max_det=1000)
    assert len(out) == 2
    for x, det in zip(pred, out):
        ref = brute_force(x, conf, iou)
        assert det.shape == ref.shape and det.shape[0] > 5
        torch.testing.assert_close(det, ref)
        assert (det[1:, 4] <= det[:-1, 4]).all()  # sorted by confidence


def test_max_det_classes_agnostic():
    pred = random_pred(3, b=1)
    full = non_max_suppression(pred, 0.05, 0.45, max_det=1000)[0]
    top = non_max_suppression(pred, 0.05, 0.45, max_det=5)[0]
    torch.testing.assert_close(top, full[:5])
    only1 = non_max_suppression(pred, 0.05, 0.45, classes=[1], max_det=1000)[0]
    torch.testing.assert_close(only1, full[full[:, 5] == 1])
    agn = non_max_suppression(pred, 0.05, 0.45, agnostic=True, max_det=1000)[0]
    assert len(agn) < len(full)
    ious = box_iou(agn[:, :4], agn[:, :4]) - torch.eye(len(agn))
    assert ious.max() <= 0.45  # no two survivors overlap, whatever their class


def test_multi_label_and_threshold():
    box = torch.tensor([50.0, 50.0, 20.0, 20.0])
    x = torch.cat((box, torch.tensor([0.9, 0.8, 0.5, 0.1]))).view(1, 1, 8)  # conf 0.72, 0.45, 0.09
    single = non_max_suppression(x, conf_thres=0.25)[0]
    assert single.shape == (1, 6) and single[0, 5] == 0 and single[0, 4] == pytest.approx(0.72)
    multi = non_max_suppression(x, conf_thres=0.25, multi_label=True)[0]
    assert multi[:, 5].tolist() == [0.0, 1.0] and multi[:, 4].tolist() == pytest.approx([0.72, 0.45])
    torch.testing.assert_close(multi[0, :4], torch.tensor([40.0, 40.0, 60.0, 60.0]))
    assert non_max_suppression(x, conf_thres=0.8)[0].shape == (0, 6)


def test_empty_and_bad_input():
    assert non_max_suppression(torch.zeros(2, 0, 7))[1].shape == (0, 6)
    with pytest.raises(ValueError, match="\\[B, N, 5\\+nc\\]"):
        non_max_suppression(torch.zeros(10, 7))
    with pytest.raises(ValueError, match="conf_thres"):
        non_max_suppression(torch.zeros(1, 1, 7), conf_thres=1.5)
    with pytest.raises(ValueError, match="iou_thres"):
        non_max_suppression(torch.zeros(1, 1, 7), iou_thres=-0.1)
    with pytest.raises(ValueError, match="max_det"):
        non_max_suppression(torch.zeros(1, 1, 7), max_det=0)
