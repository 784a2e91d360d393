"""train.py end to end on tiny generated data: one-epoch smoke run, outputs and checkpoint contents,
over-fitting 4 images, loss decrease on a fixed batch, --weights/--freeze, early stop, bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml

import train
from tests.train_helpers import FAST_HYP, tiny_yaml
from models.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from utils.data.synthetic import make_synthetic_dataset
from utils.train.results import RESULT_COLUMNS, read_results


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    data = make_synthetic_dataset(tmp / "ds", n_train=8, n_val=4, imgsz=64, seed=3)
    cfg = tmp / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_yaml()))
    return tmp, str(data), str(cfg)


@pytest.fixture(scope="module")
def smoke(files):
    """One epoch with the default hyp (mosaic on) at 64 px; returns (run() output, printed text)."""
    import contextlib
    import io

    tmp, data, cfg = files
    buf = io.StringIO()
    torch.set_num_threads(1)
    with contextlib.redirect_stdout(buf):
        out = train.run(data=data, cfg=cfg, imgsz=64, batch_size=4, epochs=1, workers=0,
                        project=str(tmp / "runs"), hyp_overrides={"nbs": 4})
    return out, buf.getvalue()


@pytest.mark.slow
def test_smoke_one_epoch_outputs(smoke):
    out, text = smoke
    d = out["save_dir"]
    assert out["epochs_done"] == 1 and d.name == "exp"
    for f in ("weights/last.pt", "weights/best.pt", "results.csv", "results.png", "hyp.yaml", "args.yaml",
              "confusion_matrix.png", "PR_curve.png", "labels.jpg", "train_batch0.jpg", "train_batch1.jpg"):
        assert (d / f).is_file(), f
    rows = read_results(d / "results.csv")
    assert len(rows) == 1 and set(RESULT_COLUMNS) <= set(rows[0])
    assert all(math.isfinite(rows[0][c]) and rows[0][c] > 0 for c in ("train/box_loss", "train/obj_loss", "val/box_loss"))
    assert rows[0]["x/lr0"] > 0
    args = yaml.safe_load((d / "args.yaml").read_text())
    assert args["epochs"] == 1 and args["imgsz"] == 64 and args["save_dir"] == str(d)
    assert yaml.safe_load((d / "hyp.yaml").read_text())["nbs"] == 4
    # --optimizer auto takes the default hyp file's optimizer (AdamW, data/hyps/short-cpu.yaml)
    for word in ("box_loss", "obj_loss", "cls_loss", "Instances", "mAP50", "Results saved to", "best.pt",
                 "AdamW lr0 0.002"):
        assert word in text, word


@pytest.mark.slow
def test_checkpoint_holds_contract_data(smoke):
    out, _ = smoke
    ck = load_checkpoint(out["last"])
    for k in ("model", "ema", "yaml", "names", "anchors", "stride", "hyp", "args", "epoch", "optimizer",
              "best_fitness", "updates", "date", "version"):
        assert k in ck, k
    assert ck["epoch"] == 0 and ck["names"] == ["class0", "class1"] and ck["updates"] == 2
    assert ck["optimizer"] is None  # stripped when the run finished
    assert tuple(ck["anchors"].shape) == (2, 3, 2) and ck["stride"].tolist() == [8.0, 16.0]
    m = model_from_checkpoint(out["best"])
    assert torch.equal(m.detect.anchors, ck["anchors"])  # AutoAnchor's anchors travel with the weights
    maps = m(torch.zeros(1, 3, 64, 64))
    assert [tuple(x.shape) for x in maps] == [(1, 3, 8, 8, 7), (1, 3, 4, 4, 7)]


@pytest.mark.slow
def test_overfit_four_images(tmp_path):
    """250 optimizer steps on 4 images (val == train) must reach mAP50 >= 0.9: loss, targets, decode,
    NMS and metrics agree. obj gain 50: YOLOv5's (imgsz / 640)^2 scaling leaves 1/100 of it at 64 px."""
    data = make_synthetic_dataset(tmp_path / "ds", n_train=4, imgsz=64, same_val=True)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_yaml()))
    out = train.run(data=str(data), cfg=str(cfg), imgsz=64, batch_size=4, epochs=250, workers=0, noval=True,
                    nosave=True, noplots=True, project=str(tmp_path / "runs"), hyp="data/hyps/default.yaml",
                    optimizer="SGD",
                    hyp_overrides=FAST_HYP | {"lr0": 0.05, "obj": 50.0})
    assert load_checkpoint(out["last"])["updates"] == 250
    assert out["metrics"].map50 >= 0.9, out["metrics"]


def test_loss_decreases_on_fixed_batch(files):
    from models.yolo import Model
    from utils.data import create_dataloader, load_hyp
    from utils.train.loss import ComputeLoss
    from utils.train.optim import build_optimizer

    tmp, data, cfg = files
    hyp = load_hyp() | FAST_HYP
    loader, _ = create_dataloader([tmp / "ds" / "images" / "train"], 64, 4, 32, hyp=hyp, augment=True, workers=0)
    imgs, targets, _, _ = next(iter(loader))
    torch.manual_seed(0)
    model = Model(cfg)
    loss_fn = ComputeLoss(model.detect.anchors, model.detect.stride, 2, hyp, imgsz=64)
    opt = build_optimizer(model, "SGD", lr=0.05, momentum=0.9, weight_decay=0.0)
    losses = []
    for _ in range(20):
        loss, _parts = loss_fn(model(imgs.float() / 255), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0], losses
    assert np.mean(losses[-5:]) < np.mean(losses[:5]), losses


@pytest.mark.slow
def test_weights_transfer_and_freeze(files, smoke, capsys):
    tmp, data, cfg = files
    out, _ = smoke
    src = load_checkpoint(out["last"])
    out2 = train.run(data=data, cfg=cfg, imgsz=64, batch_size=4, epochs=1, workers=0, noplots=True,
                     weights=str(out["last"]), freeze=2, project=str(tmp / "runs"), hyp_overrides={"nbs": 4})
    text = capsys.readouterr().out
    n = len(src["model"])
    n_anchor_keys = sum("anchors" in k for k in src["model"])
    assert n_anchor_keys >= 1
    assert f"Transferred {n - n_anchor_keys}/{n} items" in text  # everything but the anchors buffer
    assert out2["save_dir"].name == "exp2"  # runs/train/exp -> exp2
    new = load_checkpoint(out2["last"])["model"]
    frozen = [k for k in new if k.startswith(("layers.0.", "layers.1.")) and k.endswith(".weight")]
    trained = [k for k in new if k.startswith("layers.6.") and k.endswith(".weight")]
    assert frozen and all(torch.equal(new[k], src["ema"][k]) for k in frozen)
    assert any(not torch.equal(new[k], src["ema"][k]) for k in trained)


@pytest.mark.slow
def test_early_stop_with_patience(files, monkeypatch):
    from utils.eval.metrics import Metrics

    fits = iter([0.5, 0.2, 0.1, 0.1, 0.1, 0.1])

    def fake_evaluate(*a, **k):
        return Metrics(map50=0.5, map=next(fits), loss=np.zeros(3))

    monkeypatch.setattr(train, "evaluate", fake_evaluate)  # train.py's own reference to the evaluator
    tmp, data, cfg = files
    out = train.run(data=data, cfg=cfg, imgsz=64, batch_size=8, epochs=5, workers=0, patience=2, noplots=True,
                    project=str(tmp / "runs_es"), hyp_overrides=FAST_HYP)
    assert out["epochs_done"] == 3  # best at epoch 0, no gain in 1 and 2 -> stop
    assert len(read_results(out["save_dir"] / "results.csv")) == 3
    assert load_checkpoint(out["best"])["epoch"] == 0


def test_cli_flags_have_yolov5_names():
    flags = ["--data", "d.yaml", "--cfg", "m.yaml", "--weights", "w.pt", "--backbone-weights", "b.pth",
             "--hyp", "h.yaml", "--epochs", "3", "--batch-size", "8", "--imgsz", "96", "--device", "cpu",
             "--workers", "1", "--cache", "--rect", "--patience", "5", "--resume", "--freeze", "2",
             "--optimizer", "AdamW", "--cos-lr", "--label-smoothing", "0.1", "--single-cls", "--seed", "4",
             "--project", "p", "--name", "n", "--exist-ok", "--noval", "--nosave", "--save-period", "2",
             "--noautoanchor"]
    opt = train.parse_opt(flags)
    assert (opt.backbone_weights, opt.batch_size, opt.cache, opt.resume, opt.optimizer, opt.cos_lr) == \
        ("b.pth", 8, "ram", True, "AdamW", True)
    assert opt.single_cls and opt.exist_ok and opt.noval and opt.nosave and opt.noautoanchor and opt.rect
    assert (opt.label_smoothing, opt.save_period, opt.freeze, opt.seed) == (0.1, 2, 2, 4)
    default = train.parse_opt([])
    assert (default.data, default.cfg, default.imgsz, default.device, default.hyp, default.optimizer) == \
        ("data/bccd.yaml", "models/mobilenetv3-small-yolo.yaml", 320, "cpu", "data/hyps/short-cpu.yaml", "auto")
    with pytest.raises(SystemExit):
        train.parse_opt(["--optimizer", "Lion"])


def test_bad_input_is_clear(files, tmp_path):
    tmp, data, cfg = files
    common = dict(data=data, imgsz=64, batch_size=4, epochs=1, workers=0, project=str(tmp_path / "r"))
    sd = tmp_path / "mobilenet_v3_small.pth"
    torch.save({"features.0.0.weight": torch.zeros(16, 3, 3, 3)}, sd)
    with pytest.raises(CheckpointError, match="--backbone-weights"):
        train.run(cfg=cfg, weights=str(sd), **common)
    with pytest.raises(ValueError, match="multiple of the model's max stride"):
        train.run(cfg=cfg, **{**common, "imgsz": 80})
    cls_yaml = tmp_path / "cls.yaml"
    cls_yaml.write_text(yaml.safe_dump({"nc": 2, "backbone": [[-1, 1, "Conv", [8, 3, 2]]],
                                        "head": [[-1, 1, "Classify", ["nc"]]]}))
    with pytest.raises(ValueError, match="no Detect head"):
        train.run(cfg=str(cls_yaml), **common)
    from utils.data import DataConfigError

    with pytest.raises(DataConfigError, match="nope.yaml"):
        train.run(cfg=cfg, **{**common, "data": str(tmp_path / "nope.yaml")})
    with pytest.raises(ValueError, match="--batch-size"):
        train.run(cfg=cfg, **{**common, "batch_size": 0})
    with pytest.raises(TypeError, match="either"):
        train.run(train.TrainConfig(), epochs=3)
    assert not (tmp_path / "r").exists()  # bad input leaves no empty run folder behind


def test_backbone_weights_from_torchvision_state_dict(tmp_path, capsys):
    """--backbone-weights: a local torchvision MobileNetV3-Small state_dict lands in our backbone rows."""
    from torchvision.models import mobilenet_v3_small

    from utils.train.config import TrainConfig
    from utils.train.setup import build_model

    torch.manual_seed(1)
    sd = mobilenet_v3_small().state_dict()  # random init: no download; values only need to be traceable
    path = tmp_path / "mnv3s.pth"
    torch.save(sd, path)
    cfg = TrainConfig(cfg="models/mobilenetv3-small-yolo.yaml", backbone_weights=str(path))
    model = build_model(cfg, 3, ["a", "b", "c"], None, torch.device("cpu"))
    assert "loaded" in capsys.readouterr().out
    first_conv = next(v for k, v in model.state_dict().items() if k.startswith("layers.0.") and v.ndim == 4)
    assert torch.equal(first_conv, sd["features.0.0.weight"])
    bad = tmp_path / "other.pth"
    torch.save({"features.0.0.weight": torch.zeros(1, 1, 1, 1)}, bad)
    with pytest.raises(ValueError, match="no tensor fits"):
        build_model(TrainConfig(cfg="models/mobilenetv3-small-yolo.yaml", backbone_weights=str(bad)), 3,
                    ["a", "b", "c"], None, torch.device("cpu"))


@pytest.mark.slow
def test_many_flags_together(files):
    """--single-cls --rect --cos-lr --optimizer AdamW --cache ram --save-period 1 --noautoanchor
    --label-smoothing in one short run."""
    from utils.train.optim import lr_lambda

    tmp, data, cfg = files
    out = train.run(data=data, cfg=cfg, imgsz=64, batch_size=4, epochs=2, workers=0, noplots=True,
                    single_cls=True, rect=True, cos_lr=True, optimizer="AdamW", cache="ram", save_period=1,
                    noautoanchor=True, label_smoothing=0.1, project=str(tmp / "runs_flags"),
                    hyp_overrides=FAST_HYP | {"lr0": 0.001})
    d = out["save_dir"]
    ck = load_checkpoint(out["last"])
    assert ck["names"] == ["item"] and ck["yaml"]["nc"] == 1
    assert ck["anchors"].tolist() == torch.tensor(tiny_yaml()["anchors"], dtype=torch.float32).view(2, 3, 2).tolist()
    assert (d / "weights" / "epoch1.pt").is_file() and (d / "weights" / "epoch2.pt").is_file()
    assert yaml.safe_load((d / "hyp.yaml").read_text())["label_smoothing"] == 0.1
    lrs = [r["x/lr1"] for r in read_results(d / "results.csv")]
    lf = lr_lambda(2, FAST_HYP.get("lrf", 0.01), cos=True)
    assert lrs == pytest.approx([0.001 * lf(0), 0.001 * lf(1)], rel=1e-3)
    assert out["metrics"] is not None and len(out["metrics"].ap_class) <= 1  # one class in validation


@pytest.mark.slow
def test_summary_counts_skipped_images(tmp_path, capsys, caplog):
    """A corrupt image is named during the scan and counted again in the run's closing summary."""
    data = make_synthetic_dataset(tmp_path / "ds", n_train=4, n_val=2, imgsz=64, seed=5)
    bad = tmp_path / "ds" / "images" / "train" / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_yaml()))
    train.run(data=str(data), cfg=str(cfg), imgsz=64, batch_size=2, epochs=1, workers=0, noplots=True,
              project=str(tmp_path / "runs"), hyp_overrides=FAST_HYP)
    captured = capsys.readouterr()
    assert "broken.jpg" in captured.out + captured.err + caplog.text  # the scan's own warning names the file
    summary = captured.out[captured.out.index("epochs completed"):]
    assert "train data: 1 image" in summary and "skipped: see above" in summary, summary
