"""labels.jpg and train_batch*.jpg are written, readable, and show the boxes."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from utils.data.plots import plot_labels, plot_train_batch


def test_plot_labels_writes_image(tmp_path: Path) -> None:
    labels = [np.array([[0, 0.5, 0.5, 0.2, 0.3], [2, 0.1, 0.9, 0.05, 0.05]], np.float32), np.zeros((0, 5), np.float32)]
    out = plot_labels(labels, ["a", "b", "c"], tmp_path / "run")
    img = cv2.imread(str(out))
    assert out.name == "labels.jpg" and img is not None and img.shape[0] > 200 and img.shape[1] > 600
    empty = plot_labels([np.zeros((0, 5), np.float32)], ["a"], tmp_path / "bg")  # background-only split
    assert cv2.imread(str(empty)) is not None


def test_plot_train_batch_draws_boxes(tmp_path: Path) -> None:
    imgs = torch.full((3, 3, 64, 96), 20, dtype=torch.uint8)
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.5, 0.5], [2, 0, 0.25, 0.25, 0.2, 0.2]])
    out = plot_train_batch(imgs, targets, ["x/a.jpg", "b.jpg", "c.jpg"], tmp_path / "train_batch0.jpg", names=["p", "q"])
    img = cv2.imread(str(out))
    assert img.shape == (2 * 64, 2 * 96, 3)
    tile0, tile3 = img[:64, :96].astype(int), img[64:, 96:].astype(int)  # tile 3 is unused: stays white
    assert (tile3 > 240).all()
    edge = tile0[16, 40:56]  # top edge of the box (24..72 x 16..48 px) in tile 0
    assert (np.abs(edge - 20).sum(-1) > 60).all(), "box outline missing"
    inner = img[64 + 30:64 + 34, 5:10].astype(int)  # tile 2 (index 2 -> row 1, col 0), away from its box
    assert (np.abs(inner - 20).sum(-1) < 30).all()
