"""Letterbox, augmentation geometry, batches, reproducibility and the RAM cache."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from utils.ops.boxes import scale_boxes, xywhn2xyxy
from utils.data import augment as A
from utils.data.data_yaml import check_dataset, load_hyp
from utils.data.letterbox import letterbox
from utils.data.loader import create_dataloader
from utils.data.synthetic import COLORS_BGR, make_synthetic_dataset

NO_AUG = {k: 0.0 for k in ("hsv_h", "hsv_s", "hsv_v", "degrees", "translate", "scale", "shear", "perspective",
                           "flipud", "fliplr", "mosaic", "mixup")}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn"), n_train=8, n_val=5, imgsz=(96, 128), nc=3)


@pytest.mark.parametrize("shape, new, auto, scaleup", [
    ((480, 640), 320, False, True), ((640, 480), 320, False, True), ((100, 37), 64, False, True),
    ((37, 100), 320, False, False), ((300, 301), (256, 320), False, True), ((123, 457), 320, True, True),
])
def test_letterbox_then_scale_back_is_identity(shape: tuple, new, auto: bool, scaleup: bool) -> None:
    h0, w0 = shape
    img = np.zeros((h0, w0, 3), np.uint8)
    out, (rh, rw), (pw, ph) = letterbox(img, new, auto=auto, scaleup=scaleup)
    nh, nw = (new, new) if isinstance(new, int) else new
    if auto:
        assert out.shape[0] % 32 == 0 and out.shape[1] % 32 == 0 and max(out.shape[:2]) == nh
    else:
        assert out.shape[:2] == (nh, nw)
    if not scaleup:
        assert rh <= 1 and rw <= 1
    boxes = np.array([[0, 0, w0, h0], [w0 * 0.1, h0 * 0.2, w0 * 0.5, h0 * 0.9]], np.float64)
    fwd = boxes.copy()
    fwd[:, [0, 2]] = fwd[:, [0, 2]] * rw + pw
    fwd[:, [1, 3]] = fwd[:, [1, 3]] * rh + ph
    assert fwd[0, 2] <= out.shape[1] + 1e-6 and fwd[0, 3] <= out.shape[0] + 1e-6
    back = scale_boxes(out.shape[:2], fwd.copy(), (h0, w0), ratio_pad=((rh, rw), (pw, ph)))
    np.testing.assert_allclose(back, boxes, atol=1e-6)
    # the image content sits exactly where the mapping says: pad is grey, content is not
    marked = letterbox(np.full((h0, w0, 3), 255, np.uint8), new, auto=auto, scaleup=scaleup)[0]
    x1, y1, x2, y2 = (int(round(v)) for v in fwd[0])
    assert (marked[y1:y2, x1:x2] == 255).all() and (marked == 114).sum() == marked.size - (y2 - y1) * (x2 - x1) * 3


def _square_masks(img_bgr: np.ndarray, cls: int) -> np.ndarray:
    return np.abs(img_bgr.astype(int) - COLORS_BGR[cls]).sum(-1) < 60


def test_mosaic_affine_boxes_enclose_their_squares(synth: Path) -> None:
    hyp = {**NO_AUG, "mosaic": 1.0, "degrees": 10.0, "translate": 0.2, "scale": 0.5, "shear": 3.0, "fliplr": 0.5,
           "flipud": 0.5}
    cfg = check_dataset(synth)
    _, ds = create_dataloader(cfg.train, 128, 4, hyp=hyp, augment=True, workers=0, nc=3)
    n_boxes = 0
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            img, t, _, shapes = ds[i]
            assert shapes is None and img.shape == (3, 128, 128)
            bgr = img.numpy().transpose(1, 2, 0)[:, :, ::-1]
            boxes = xywhn2xyxy(t[:, 2:].numpy().astype(float), 128, 128)
            classes = t[:, 1].int().tolist()
            for k, ((x1, y1, x2, y2), c) in enumerate(zip(boxes, classes)):
                full = _square_masks(bgr, c)
                mask = full.copy()
                for j, (ox1, oy1, ox2, oy2) in enumerate(boxes):  # squares of the same colour next door
                    if j != k and classes[j] == c:
                        mask[max(int(oy1) - 1, 0):int(oy2) + 2, max(int(ox1) - 1, 0):int(ox2) + 2] = False
                m = 6  # look around the box: square pixels just outside it mean the box is too small
                X1, Y1 = max(int(x1) - m, 0), max(int(y1) - m, 0)
                ys, xs = np.nonzero(mask[Y1:int(np.ceil(y2)) + m, X1:int(np.ceil(x2)) + m])
                if len(xs):
                    assert xs.min() + X1 >= x1 - 2 and xs.max() + X1 <= x2 + 2, (epoch, i, k)
                    assert ys.min() + Y1 >= y1 - 2 and ys.max() + Y1 <= y2 + 2, (epoch, i, k)
                inside = full[int(y1):int(np.ceil(y2)), int(x1):int(np.ceil(x2))].mean()
                # small boxes are mostly blended edge pixels; a rotated square cut by the image border
                # keeps the clipped box of its corners, legitimately looser than the visible wedge
                loose = min(x2 - x1, y2 - y1) < 10 or min(x1, y1) < 1 or max(x2, y2) > 127
                assert inside > 0.4 or loose, f"box {k} of class {c} is mostly empty ({inside:.2f} is its square)"
                n_boxes += 1
    assert n_boxes >= 20


def test_val_batches_contract_and_labels_map_back(synth: Path) -> None:
    cfg = check_dataset(synth)
    loader, ds = create_dataloader(cfg.val, 64, 2, workers=0, nc=3)
    assert len(loader) == 3
    seen = 0
    for imgs, targets, paths, shapes in loader:
        assert imgs.dtype == torch.uint8 and imgs.shape[1:] == (3, 64, 64)
        assert targets.dtype == torch.float32 and targets.ndim == 2 and targets.shape[1] == 6
        assert set(targets[:, 0].int().tolist()) <= set(range(len(paths))) and len(paths) == imgs.shape[0]
        assert ((targets[:, 2:] >= 0) & (targets[:, 2:] <= 1)).all()
        for j, ((h0, w0), ratio_pad) in enumerate(shapes):
            assert (h0, w0) == (96, 128)
            t = targets[targets[:, 0] == j]
            px = xywhn2xyxy(t[:, 2:].double(), 64, 64)
            back = scale_boxes((64, 64), px, (h0, w0), ratio_pad=ratio_pad)
            k = ds.im_files.index(paths[j])
            want = xywhn2xyxy(torch.from_numpy(ds.labels[k][:, 1:]).double(), w0, h0)
            torch.testing.assert_close(back, want, atol=1e-3, rtol=0)
            assert torch.equal(t[:, 1], torch.from_numpy(ds.labels[k][:, 0]))
            seen += 1
    assert seen == 5


def test_rect_batches_are_stride_multiples(tmp_path: Path) -> None:
    wide = make_synthetic_dataset(tmp_path / "w", n_train=3, n_val=1, imgsz=(60, 120))
    tall = make_synthetic_dataset(tmp_path / "t", n_train=3, n_val=1, imgsz=(120, 60))
    srcs = [wide.parent / "images" / "train", tall.parent / "images" / "train"]
    loader, ds = create_dataloader(srcs, 128, 3, rect=True, shuffle=True, workers=0, stride=32)
    got = [tuple(b[0].shape[2:]) for b in loader]
    assert got == [(64, 128), (128, 64)]
    assert ds.batch_shapes.tolist() == [[64, 128], [128, 64]]


def _batch(ds_loader) -> tuple[torch.Tensor, torch.Tensor]:
    imgs, targets, _, _ = next(iter(ds_loader))
    return imgs, targets


def test_same_seed_same_batch_any_workers_and_epochs_differ(synth: Path) -> None:
    cfg = check_dataset(synth)
    hyp = load_hyp()
    mk = lambda seed, workers: create_dataloader(cfg.train, 96, 4, hyp=hyp, augment=True, shuffle=True,
                                                 workers=workers, seed=seed, nc=3)
    l0, d0 = mk(3, 0)
    l2, d2 = mk(3, 2)
    a, b = _batch(l0), _batch(l2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # worker processes change nothing
    assert a[0].shape == (4, 3, 96, 96) and a[1].shape[1] == 6
    d0.set_epoch(1)
    d2.set_epoch(1)  # reaches the persistent workers through shared memory
    c, d = _batch(l0), _batch(l2)
    assert torch.equal(c[0], d[0]) and not torch.equal(a[0], c[0])
    other = _batch(mk(4, 0)[0])
    assert not torch.equal(a[0], other[0])


def test_flip_and_hsv_follow_hyp(synth: Path) -> None:
    cfg = check_dataset(synth)
    _, plain = create_dataloader(cfg.train, 128, 2, hyp=NO_AUG, augment=True, workers=0, nc=3)
    _, flipped = create_dataloader(cfg.train, 128, 2, hyp={**NO_AUG, "fliplr": 1.0}, augment=True, workers=0, nc=3)
    img0, t0, _, _ = plain[1]
    img1, t1, _, _ = flipped[1]
    assert torch.equal(img1, img0.flip(-1))
    torch.testing.assert_close(t1[:, 2], 1 - t0[:, 2])
    torch.testing.assert_close(t1[:, 3:], t0[:, 3:])
    img = np.full((8, 8, 3), (40, 120, 200), np.uint8)
    assert np.array_equal(A.augment_hsv(img.copy(), np.random.default_rng(0), 0, 0, 0), img)
    assert not np.array_equal(A.augment_hsv(img.copy(), np.random.default_rng(0), 0.1, 0.7, 0.4), img)


def test_ram_cache_gives_identical_batches(synth: Path) -> None:
    cfg = check_dataset(synth)
    a = _batch(create_dataloader(cfg.val, 64, 5, workers=0, nc=3)[0])
    loader, ds = create_dataloader(cfg.val, 64, 5, workers=0, nc=3, cache="ram")
    assert all(im is not None for im in ds.ims)
    b = _batch(loader)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="cache must be"):
        create_dataloader(cfg.val, 64, 5, workers=0, cache="disk-ish")


def test_random_perspective_drops_boxes_pushed_out() -> None:
    img = np.full((100, 100, 3), 50, np.uint8)
    labels = np.array([[0, 10, 10, 40, 40], [1, 98, 98, 100, 100]], np.float32)
    out, kept = A.random_perspective(img, labels, np.random.default_rng(0), translate=0, scale=0)
    assert out.shape == img.shape and kept[:, 0].tolist() == [0.0]  # the 2x2 px box is too small
    np.testing.assert_allclose(kept[0, 1:], labels[0, 1:], atol=1e-4)


def test_distributed_ranks_split_the_data(synth: Path) -> None:
    cfg = check_dataset(synth)
    seen = []
    for rank in (0, 1):
        loader, ds = create_dataloader(cfg.train, 64, 2, hyp=NO_AUG, augment=True, workers=0, shuffle=True,
                                       rank=rank, world_size=2, nc=3)
        ds.set_epoch(1)
        assert loader.sampler.epoch == 1 and len(loader) == 2
        seen.append([p for _, _, paths, _ in loader for p in paths])
    assert len(seen[0]) == len(seen[1]) == 4 and not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(ds.im_files)


def test_mixup_blends_images_and_keeps_both_label_sets() -> None:
    a, b = np.full((4, 4, 3), 200, np.uint8), np.full((4, 4, 3), 0, np.uint8)
    la, lb = np.array([[0, 1, 1, 2, 2]], np.float32), np.array([[1, 0, 0, 3, 3], [2, 1, 1, 3, 3]], np.float32)
    img, lab = A.mixup(a, la, b, lb, np.random.default_rng(0))
    assert 60 < img.mean() < 140 and (img == img[0, 0]).all()  # Beta(32, 32) weights stay near 0.5
    assert lab[:, 0].tolist() == [0, 1, 2]
