"""evaluate and val.py end to end on a tiny generated dataset (non-square images, letterboxed)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import val
from tests.backend_helpers import make_checkpoint
from utils.core.errors import FlagError, cli_main
from utils.core.paths import ROOT
from utils.data import check_dataset, create_dataloader
from utils.data.synthetic import make_synthetic_dataset
from utils.eval.evaluator import evaluate

IMGSZ = 128
CFG = ROOT / "models/mobilenetv3-small-yolo.yaml"


@pytest.fixture(scope="module")
def data_yaml(tmp_path_factory):
    # 96x128 originals letterboxed into 128-wide batches: boxes must be mapped back, not just rescaled
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn"), n_train=2, n_val=5, imgsz=(96, 128), nc=2, seed=3)


def make_loader(data_yaml):
    cfg = check_dataset(data_yaml)
    loader, dataset = create_dataloader(cfg.val, IMGSZ, batch_size=2, stride=32, rect=True, workers=0, pad=0.5)
    return cfg, loader, dataset


class Oracle:
    """Stand-in backend that 'predicts' each batch's own targets as a decoded [B, N, 5+nc] tensor."""

    def __init__(self, loader, nc):
        self.batches, self.nc, self.calls = [b[1] for b in loader], nc, 0

    def __call__(self, x):
        t = self.batches[self.calls]
        self.calls += 1
        b, _, h, w = x.shape
        n = max(int((t[:, 0] == i).sum()) for i in range(b))
        out = torch.zeros(b, n + 1, 5 + self.nc)
        for i in range(b):
            ti = t[t[:, 0] == i]
            out[i, :len(ti), :4] = ti[:, 2:6] * torch.tensor([w, h, w, h])
            out[i, :len(ti), 4] = 0.9
            out[i, torch.arange(len(ti)), 5 + ti[:, 1].long()] = 1.0
        return out


def test_oracle_scores_one_and_boxes_return_to_original_pixels(data_yaml, tmp_path):
    cfg, loader, dataset = make_loader(data_yaml)
    m = evaluate(Oracle(loader, cfg.nc), loader, cfg.names, save_dir=tmp_path, plots=True, save_json=True,
                     save_txt=True, loss_fn=lambda *a: pytest.fail("no loss on decoded output"))
    assert m.map == pytest.approx(1.0) and m.map50 == pytest.approx(1.0)
    assert m.p == pytest.approx(1.0) and m.r == pytest.approx(1.0) and m.loss is None
    n_labels = sum(len(lb) for lb in dataset.labels)
    assert m.n_images == 5 and int(m.nt.sum()) == n_labels
    assert m.coco_stats[0] == pytest.approx(1.0) and m.coco_stats[1] == pytest.approx(1.0)
    for f in ("PR_curve.png", "F1_curve.png", "P_curve.png", "R_curve.png", "confusion_matrix.png",
              "val_batch0_pairs.jpg", "predictions.json", "gt_coco.json"):
        assert (tmp_path / f).stat().st_size > 1000 or f.endswith("json"), f
    assert np.trace(m.confusion.matrix) == n_labels and m.confusion.matrix.sum() == n_labels
    # COCO ground truth in original pixels equals the label files times the original size
    gt = json.loads((tmp_path / "gt_coco.json").read_text())
    by_name = {im["file_name"]: im for im in gt["images"]}
    for file, lab, (w0, h0) in zip(dataset.im_files, dataset.labels, dataset.shapes):
        im = by_name[file.split("/")[-1]]
        assert (im["width"], im["height"]) == (w0, h0) == (128, 96)
        boxes = np.array([a["bbox"] for a in gt["annotations"] if a["image_id"] == im["id"]])
        expect = np.stack(((lab[:, 1] - lab[:, 3] / 2) * w0, (lab[:, 2] - lab[:, 4] / 2) * h0,
                           lab[:, 3] * w0, lab[:, 4] * h0), 1)
        np.testing.assert_allclose(boxes, expect, atol=0.05)
    txt = sorted((tmp_path / "labels").glob("*.txt"))
    assert len(txt) == 5 and len(txt[0].read_text().splitlines()[0].split()) == 5
    # a custom dataset keeps today's ids: images 0.., categories = our 0-based class indices
    dets = json.loads((tmp_path / "predictions.json").read_text())
    assert {d["image_id"] for d in dets} == set(range(5)) == {im["id"] for im in gt["images"]}
    assert {d["category_id"] for d in dets} <= {0, 1} and [c["id"] for c in gt["categories"]] == [0, 1]
    assert {a["category_id"] for a in gt["annotations"]} <= {0, 1}


def test_single_cls_and_empty_loader(data_yaml, capsys):
    cfg, loader, dataset = make_loader(data_yaml)
    m = evaluate(Oracle(loader, cfg.nc), loader, cfg.names, single_cls=True)
    assert m.ap_class.tolist() == [0] and m.map == pytest.approx(1.0)
    assert int(m.nt[0]) == sum(len(lb) for lb in dataset.labels)
    empty = evaluate(lambda x: pytest.fail("no batches"), [], cfg.names)
    assert empty.n_images == 0 and empty.map == 0
    assert "no labels" in capsys.readouterr().out


def test_raw_maps_are_decoded_and_loss_averaged(data_yaml, capsys):
    from models.yolo import Model

    cfg, loader, _ = make_loader(data_yaml)
    model = Model(CFG, nc=cfg.nc).train()
    calls = []

    def loss_fn(maps, targets):
        calls.append(len(maps))
        return maps[0].sum(), torch.tensor([1.0, 2.0, 3.0]) * len(calls)

    m = evaluate(model, loader, cfg.names, verbose=True, loss_fn=loss_fn)
    assert calls == [3, 3, 3] and m.loss.tolist() == pytest.approx([2.0, 4.0, 6.0])
    assert model.training  # restored for the caller (train.py)
    assert 0 <= m.map <= m.map50 <= 1 and set(m.speed) == {"pre", "inf", "nms"} and m.speed["inf"] > 0
    out = capsys.readouterr().out
    assert "mAP50-95" in out and "all" in out and "class0" in out and "Speed:" in out
    assert m.results_dict()["val/cls_loss"] == pytest.approx(6.0)


def test_run_cli_on_checkpoint(data_yaml, tmp_path, capsys):
    from models.checkpoint import save_checkpoint
    from models.yolo import Model

    model = Model(CFG, nc=2)
    model.names = ["class0", "class1"]
    ckpt = {"model": model.state_dict(), "ema": None, "yaml": model.yaml, "names": model.names,
            "anchors": model.detect.anchors, "stride": model.stride, "args": {"imgsz": IMGSZ}, "epoch": 0}
    weights = save_checkpoint(ckpt, tmp_path / "w.pt")
    args = ["--data", str(data_yaml), "--weights", str(weights), "--imgsz", str(IMGSZ), "--batch-size", "4",
            "--workers", "0", "--project", str(tmp_path / "runs"), "--conf-thres", "0.01", "--noplots"]
    m = val.main(args)
    assert (tmp_path / "runs/exp").is_dir() and 0 <= m.map <= 1 and m.n_images == 5
    assert "Results saved to" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no 'test' split"):
        val.main(args + ["--task", "test"])
    with pytest.raises(ValueError, match="classes"):
        val.run(data_yaml, weights_for_nc(tmp_path, 3), imgsz=IMGSZ, workers=0, project=tmp_path / "runs")
    with pytest.raises(ValueError, match="not found"):
        val.run(data_yaml, tmp_path / "missing.pt", workers=0, project=tmp_path / "runs")


def weights_for_nc(tmp_path, nc):
    from models.checkpoint import save_checkpoint
    from models.yolo import Model

    model = Model(CFG, nc=nc)
    return save_checkpoint({"model": model.state_dict(), "yaml": model.yaml, "names": [str(i) for i in range(nc)],
                            "stride": model.stride}, tmp_path / f"nc{nc}.pt")


def test_bad_model_output_and_missing_save_dir(data_yaml, tmp_path):
    cfg, loader, _ = make_loader(data_yaml)
    with pytest.raises(ValueError, match="raw maps or a decoded"):
        evaluate(lambda x: torch.zeros(2, 7), loader, cfg.names)
    with pytest.raises(ValueError, match="no `detect` head"):
        evaluate(lambda x: [torch.zeros(2, 3, 4, 4, 7)], loader, cfg.names)
    with pytest.raises(ValueError, match="save_dir"):
        evaluate(lambda x: torch.zeros(2, 1, 7), loader, cfg.names, plots=True)
    with pytest.raises(ValueError, match="80 COCO classes"):
        evaluate(lambda x: torch.zeros(2, 1, 7), loader, cfg.names, save_dir=tmp_path, save_json=True, coco80=True)


def test_task_flag_picks_split_and_times_speed(data_yaml, tmp_path, capsys):
    weights = make_checkpoint(tmp_path / "tiny.pt", imgsz=IMGSZ, obj_logit=1.0)
    args = ["--data", str(data_yaml), "--weights", str(weights), "--imgsz", str(IMGSZ), "--workers", "0",
            "--project", str(tmp_path / "runs")]
    assert val.main(args + ["--task", "train", "--noplots"]).n_images == 2  # the train split, not val's 5
    assert "train: " in capsys.readouterr().out
    # speed: val split, batch 1, conf 0.25 / IoU 0.45, no plots or JSON even when asked, ms per stage printed
    m = val.main(args + ["--task", "speed", "--save-json", "--name", "speed"])
    out = capsys.readouterr().out
    assert m.n_images == 5 and m.coco_stats is None and not any((tmp_path / "runs/speed").iterdir())
    assert "Speed: " in out and "ms inference" in out and "--task speed: tiny.pt (pt), 5 images" in out
    assert "batch 1" in out and "conf 0.25, IoU 0.45" in out
    # a missing split: one line naming the key and the YAML, exit 2
    assert cli_main("val.py", val.main, args + ["--task", "test"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("val.py: error: ") and str(data_yaml) in err[0]
    assert "no 'test' split defined (key 'test')" in err[0]
    with pytest.raises(FlagError, match="expected one of train, val, test, speed"):
        val.run(data_yaml, weights, task="bench", workers=0, project=tmp_path / "runs")
    with pytest.raises(SystemExit):
        val.parse_opt(["--weights", str(weights), "--task", "bench"])
