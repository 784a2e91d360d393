"""utils.eval.confusion on a hand-made image whose every cell is known."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from utils.eval.confusion import ConfusionMatrix


def test_hand_made_case():
    labels = np.array([[0, 0, 0, 10, 10],      # found as class 0
                       [1, 20, 0, 30, 10],     # found, but called class 0
                       [1, 40, 0, 50, 10],     # missed
                       [2, 60, 0, 70, 10]])    # two detections: the better one matches, the other is a FP
    dets = np.array([[0, 0, 10, 10, 0.9, 0],
                     [20, 0, 30, 10, 0.8, 0],
                     [60, 0, 70, 10, 0.7, 2],
                     [61, 0, 70, 10, 0.6, 2],  # IoU 0.9 with the same object, matched second -> background col
                     [90, 90, 99, 99, 0.5, 1],  # nothing there
                     [40, 0, 50, 10, 0.2, 1]])  # below conf 0.25: ignored, so label 2 stays missed
    cm = ConfusionMatrix(nc=3)
    cm.process_batch(dets, labels)
    expect = np.array([[1, 1, 0, 0],   # predicted 0: true 0, true 1
                       [0, 0, 0, 1],   # predicted 1: background FP
                       [0, 0, 1, 1],   # predicted 2: true 2, duplicate FP
                       [0, 1, 0, 0]])  # background row: the missed class-1 object
    np.testing.assert_array_equal(cm.matrix, expect)
    tp, fp, fn = cm.tp_fp_fn()
    assert tp.tolist() == [1, 0, 1] and fp.tolist() == [1, 1, 1] and fn.tolist() == [0, 2, 0]
    norm = cm.normalized()
    assert norm[:, 1].tolist() == [0.5, 0, 0, 0.5] and norm[:, 3].sum() == pytest.approx(1.0)


def test_greedy_by_iou_and_empty_images():
    cm = ConfusionMatrix(nc=2, iou_thres=0.3)
    # one detection overlapping two labels: it goes to the label with the higher IoU
    cm.process_batch(torch.tensor([[0.0, 0, 10, 10, 0.9, 1]]),
                     torch.tensor([[0.0, 0, 0, 10, 6], [1.0, 0, 0, 10, 9]]))
    assert cm.matrix[1, 1] == 1 and cm.matrix[2, 0] == 1 and cm.matrix.sum() == 2
    cm.process_batch(np.zeros((0, 6)), np.array([[0, 0, 0, 5, 5]]))  # no detections
    cm.process_batch(np.array([[0, 0, 5, 5, 0.9, 0]]), np.zeros((0, 5)))  # no labels
    assert cm.matrix[2, 0] == 2 and cm.matrix[0, 2] == 1


def test_bad_input():
    with pytest.raises(ValueError, match="nc"):
        ConfusionMatrix(0)
    cm = ConfusionMatrix(2)
    with pytest.raises(ValueError, match="detection class 5"):
        cm.process_batch(np.array([[0, 0, 5, 5, 0.9, 5]]), np.zeros((0, 5)))
    with pytest.raises(ValueError, match="label class -1"):
        cm.process_batch(np.zeros((0, 6)), np.array([[-1, 0, 0, 5, 5]]))
