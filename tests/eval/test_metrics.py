"""utils.eval.metrics against pycocotools' COCOeval itself (the reference), plus the easy limits."""
from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch

from utils.eval.coco import coco_detections, coco_gt_dict, run_cocoeval, save_coco_json
from utils.eval.metrics import Metrics, compute_metrics, fitness, match_detections

IMG = (240, 320)  # h, w of every generated image


def _boxes(rng, n, size=(10, 80)):
    wh = rng.uniform(*size, (n, 2))
    xy = rng.uniform(0, 1, (n, 2)) * (np.array([IMG[1], IMG[0]]) - wh)
    return np.concatenate((xy, xy + wh), 1)


def make_case(seed, n_img=10, nc=3, max_gt=8, dup=False, ties=False, fp=4):
    """Random GT and detections jittered around it (some wrong class), plus background false positives."""
    rng = np.random.default_rng(seed)
    preds, gts = [], []
    for _ in range(n_img):
        m = int(rng.integers(0, max_gt + 1))
        g = np.concatenate((rng.integers(0, nc, (m, 1)), _boxes(rng, m)), 1)
        rows = []
        for c, *box in g:
            for _k in range(int(rng.integers(0, 3))):
                b = np.array(box) + rng.normal(0, 6, 4)
                cls = c if rng.random() < 0.85 else rng.integers(0, nc)
                rows.append([*b, rng.random(), cls])
        for b in _boxes(rng, int(rng.integers(0, fp + 1))):
            rows.append([*b, rng.random() * 0.5, rng.integers(0, nc)])
        p = np.array(rows, dtype=np.float64).reshape(-1, 6)
        if dup and len(p):
            p = np.concatenate((p, p[: len(p) // 2]))  # exact duplicates, equal scores too
        if ties:
            p[:, 4] = np.round(p[:, 4], 1)
        preds.append(p.astype(np.float32))
        gts.append(g.astype(np.float32))
    return preds, gts


def cocoeval_reference(preds, gts, nc, tmp_path):
    """(mAP@.5:.95, mAP@.5, per-class AP [nc] or nan) straight from pycocotools."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_path, pred_path = save_coco_json(preds, gts, [IMG] * len(gts), [str(i) for i in range(nc)], tmp_path)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        ev = COCOeval(gt, gt.loadRes(str(pred_path)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    prec = ev.eval["precision"][:, :, :, 0, -1]  # [T, R, K], area all, maxDets 100
    per_class = np.array([prec[:, :, k].mean() if (prec[:, :, k] > -1).all() else np.nan for k in range(nc)])
    return ev.stats[0], ev.stats[1], per_class


def assert_parity(preds, gts, nc, tmp_path):
    ref_map, ref_map50, ref_class = cocoeval_reference(preds, gts, nc, tmp_path)
    m = compute_metrics(preds, gts, nc)
    assert abs(m.map - ref_map) < 1e-9, (m.map, ref_map)
    assert abs(m.map50 - ref_map50) < 1e-9, (m.map50, ref_map50)
    np.testing.assert_allclose(m.ap, ref_class[m.ap_class], atol=1e-9)
    assert np.isnan(np.delete(ref_class, m.ap_class)).all()  # classes without GT are skipped by both
    return m


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_parity_random(seed, tmp_path):
    m = assert_parity(*make_case(seed), nc=3, tmp_path=tmp_path)
    assert 0.05 < m.map < m.map50 < 1  # a non-degenerate case, not a trivial 0 or 1


def test_parity_score_ties_and_duplicates(tmp_path):
    preds, gts = make_case(3, dup=True, ties=True)
    gts[0] = np.concatenate((gts[0], gts[0][:2])) if len(gts[0]) else gts[0]  # duplicate ground truth too
    assert_parity(preds, gts, 3, tmp_path)


def test_parity_empty_images_and_missing_classes(tmp_path):
    preds, gts = make_case(4, n_img=8, nc=4)
    gts[1] = np.zeros((0, 5), np.float32)  # image without GT, but with detections
    preds[2] = np.zeros((0, 6), np.float32)  # image without detections
    gts[3], preds[3] = np.zeros((0, 5), np.float32), np.zeros((0, 6), np.float32)
    for p in preds:
        p[p[:, 5] == 2, 5] = 1  # class 2 is in GT but never predicted
    for g in gts:
        g[g[:, 0] == 3, 0] = 0  # class 3 is predicted but absent from GT
    assert (np.concatenate(preds)[:, 5] == 3).any()
    m = assert_parity(preds, gts, 4, tmp_path)
    assert 2 in m.ap_class and 3 not in m.ap_class and m.ap[list(m.ap_class).index(2)] == 0


def test_parity_over_100_detections_per_image(tmp_path):
    rng = np.random.default_rng(5)
    g = np.concatenate((np.arange(30)[:, None] % 2, _boxes(rng, 30, (20, 40))), 1)
    jitter = np.repeat(g[:, 1:], 8, 0) + rng.normal(0, 4, (240, 4))
    p = np.concatenate((jitter, np.round(rng.random((240, 1)), 2), np.repeat(g[:, :1], 8, 0)), 1)
    assert (np.bincount(p[:, 5].astype(int)) > 100).all()  # > 100 per class, not only per image
    preds, gts = make_case(6, n_img=3)
    preds, gts = [p.astype(np.float32), *preds], [g.astype(np.float32), *gts]
    m = assert_parity(preds, gts, 3, tmp_path)
    assert len(match_detections(preds[:1], gts[:1], 3).conf) == 200  # 100 kept per (image, class)


def test_parity_iou_exactly_on_thresholds(tmp_path):
    g = np.array([[0, 0, 0, 10, 10], [0, 0, 0, 10, 10], [1, 50, 50, 60, 60]], np.float32)
    p = np.array([[0, 0, 10, 5, 0.9, 0], [0, 0, 10, 7.5, 0.8, 0], [0, 0, 10, 10, 0.8, 0],
                  [50, 50, 60, 55, 0.5, 1], [50, 52.5, 60, 60, 0.5, 1]], np.float32)
    # equal IoU (0.6) with two GT: COCOeval gives the first detection the later GT, so the second is a hit
    g2 = np.array([[0, 0, 0, 10, 10], [0, 5, 0, 15, 10]], np.float32)
    p2 = np.array([[2.5, 0, 12.5, 10, 0.9, 0], [0, 0, 10, 10, 0.8, 0]], np.float32)
    m = assert_parity([p, p2], [g, g2], 2, tmp_path)
    assert compute_metrics([p2], [g2], 1).map50 == pytest.approx(1.0)
    assert m.map50 < 1


def test_parity_degenerate_boxes(tmp_path):
    preds, gts = make_case(11)
    for p in preds[::2]:
        p[::3, [0, 2]] = p[::3, [2, 0]]  # x2 < x1: negative area, which COCOeval ignores when unmatched
    assert any((p[:, 2] < p[:, 0]).any() for p in preds)
    assert_parity(preds, gts, 3, tmp_path)


def test_chunked_matching_equals_one_chunk():
    preds, gts = make_case(12, n_img=12, max_gt=12)
    one = match_detections(preds, gts, 3)
    many = match_detections(preds, gts, 3, chunk_elems=60)  # forces dozens of small padded chunks
    assert one.tp.any() and (one.tp == many.tp).all() and (one.conf == many.conf).all()


def test_perfect_and_no_predictions():
    _, gts = make_case(7)
    perfect = [np.concatenate((g[:, 1:], np.full((len(g), 1), 0.9), g[:, :1]), 1) for g in gts]
    m = compute_metrics(perfect, gts, 3)
    assert m.map == pytest.approx(1.0) and m.map50 == pytest.approx(1.0)
    assert m.p == pytest.approx(1.0) and m.r == pytest.approx(1.0) and m.f1 == pytest.approx(1.0)
    assert m.fitness() == pytest.approx(1.0) and m.conf_best <= 0.9
    none = compute_metrics([np.zeros((0, 6))] * len(gts), gts, 3)
    assert none.map == 0 and none.map50 == 0 and none.p == 0 and none.r == 0
    assert (none.nt == np.bincount(np.concatenate(gts)[:, 0].astype(int), minlength=3)).all()


def test_no_ground_truth_at_all():
    preds, _ = make_case(8, n_img=2)
    m = compute_metrics(preds, [np.zeros((0, 5))] * 2, 3)
    assert m.map == 0 and len(m.ap_class) == 0 and m.nt.tolist() == [0, 0, 0]


def test_prf1_at_best_confidence():
    # one class, 2 GT: a hit at 0.9, a false positive at 0.8, a hit at 0.3 -> F1 best at conf <= 0.3
    g = np.array([[0, 0, 0, 10, 10], [0, 20, 20, 30, 30]])
    p = np.array([[0, 0, 10, 10, 0.9, 0], [50, 50, 60, 60, 0.8, 0], [20, 20, 30, 30, 0.3, 0]])
    m = compute_metrics([p], [g], 1)
    assert m.p == pytest.approx(2 / 3) and m.r == pytest.approx(1.0) and m.f1 == pytest.approx(0.8)
    assert m.conf_best <= 0.3
    assert m.results_dict()["metrics/mAP_0.5"] == m.map50
    assert fitness(0.5, 0.3) == pytest.approx(0.32)


def test_torch_inputs_match_numpy():
    preds, gts = make_case(9, n_img=3)
    a = compute_metrics(preds, gts, 3)
    b = compute_metrics([torch.from_numpy(p) for p in preds], [torch.from_numpy(g) for g in gts], 3)
    assert a.map == b.map and a.map50 == b.map50


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="preds\\[1\\]"):
        compute_metrics([np.zeros((0, 6)), np.zeros((2, 4))], [np.zeros((0, 5))] * 2, 2)
    with pytest.raises(ValueError, match="NaN"):
        compute_metrics([np.array([[0, 0, 1, 1, np.nan, 0]])], [np.zeros((0, 5))], 2)
    with pytest.raises(ValueError, match="gts has 2"):
        compute_metrics([np.zeros((0, 6))], [np.zeros((0, 5))] * 2, 2)
    with pytest.raises(ValueError, match="gts\\[0\\]: a box has x2 < x1"):
        compute_metrics([np.zeros((0, 6))], [np.array([[0, 5, 0, 1, 1]])], 2)
    with pytest.raises(ValueError, match="negative class"):
        compute_metrics([np.zeros((0, 6))], [np.array([[-1, 0, 0, 1, 1]])], 2)
    assert isinstance(Metrics(), Metrics) and Metrics().fitness() == 0


def test_coco_json_and_run_cocoeval(tmp_path):
    preds, gts = make_case(10, n_img=4)
    gt = coco_gt_dict(gts, [IMG] * 4, ["a", "b", "c"])
    assert [a["id"] for a in gt["annotations"]][:1] == [1]  # id 0 would read as "unmatched" in COCOeval
    assert len(coco_detections(preds)) == sum(len(p) for p in preds)
    gt_path, pred_path = save_coco_json(preds, gts, [IMG] * 4, ["a", "b", "c"], tmp_path)
    stats = run_cocoeval(gt_path, pred_path, verbose=False)
    m = compute_metrics(preds, gts, 3)
    assert stats.shape == (12,) and abs(stats[0] - m.map) < 1e-4 and abs(stats[1] - m.map50) < 1e-4
    empty = save_coco_json([np.zeros((0, 6))] * 4, gts, [IMG] * 4, ["a", "b", "c"], tmp_path / "e")[1]
    assert (run_cocoeval(gt_path, empty, verbose=False) == 0).all()
    with pytest.raises(ValueError, match="image shapes"):
        coco_gt_dict(gts, [IMG], ["a"])
