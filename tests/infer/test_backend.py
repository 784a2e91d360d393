"""utils.infer.backend.DetectBackend: .pt/.torchscript/.onnx behind one call, metadata, bad and unsafe files."""
from __future__ import annotations

import os
import pickle

import onnx
import pytest
import torch
from torch import nn

from tests.backend_helpers import make_checkpoint, write_malicious
from utils.export.metadata import export_metadata
from utils.infer.backend import BackendError, DetectBackend
from utils.infer.runtime import physical_cores
from models.checkpoint import model_from_checkpoint
from utils.ops.decode import Decoder
from utils.export.exporters import export_onnx, export_torchscript

NAMES = ["red", "green"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny checkpoint and its ONNX (static, batch 1, 64x64) and TorchScript exports."""
    d = tmp_path_factory.mktemp("backend")
    pt = make_checkpoint(d / "tiny.pt", names=NAMES, imgsz=64)
    model = model_from_checkpoint(pt).fuse().eval()
    x = torch.zeros(1, 3, 64, 64)
    strides = model.detect.stride.tolist()
    onnx_file = export_onnx(Decoder(model), x, d / "tiny.onnx", export_metadata(NAMES, strides, (64, 64), 1, False))
    ts_file = export_torchscript(Decoder(model), x, d / "tiny.torchscript",
                                 export_metadata(NAMES, strides, (64, 64), 1, True))
    return {"pt": pt, "onnx": onnx_file, "torchscript": ts_file, "dir": d}


def test_pt_backend_fuses_and_matches_unfused_model(files):
    b = DetectBackend(files["pt"])
    assert (b.fmt, b.names, b.nc, b.stride, b.imgsz, b.dynamic) == ("pt", NAMES, 2, 16, (64, 64), True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in b.model.modules()), "BN not fused"
    x = torch.rand(2, 3, 64, 96)
    out = b(x)
    assert out.shape == (2, 3 * (8 * 12 + 4 * 6), 7)
    with torch.no_grad():
        ref = Decoder(model_from_checkpoint(files["pt"]))(x)  # unfused, contiguous
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert not out.requires_grad and not out.is_inference()
    out[..., 4] *= 0.5  # callers (NMS, val) may edit the result in place


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exports_read_metadata_and_match_pt(files, fmt):
    b = DetectBackend(files[fmt])
    assert (b.fmt, b.names, b.nc, b.stride, b.strides, b.imgsz) == (fmt, NAMES, 2, 16, [8.0, 16.0], (64, 64))
    x = torch.rand(1, 3, 64, 64)
    out, ref = b(x), DetectBackend(files["pt"])(x)
    assert out.shape == ref.shape == (1, 3 * (64 + 16), 7)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert not out.is_inference()


def test_static_onnx_runs_larger_batches_in_chunks_and_refuses_other_sizes(files):
    b = DetectBackend(files["onnx"], threads=1)
    assert (b.dynamic, b.batch) == (False, 1)
    assert b.session.get_session_options().intra_op_num_threads == 1
    x = torch.rand(3, 3, 64, 64)
    out = b(x)
    assert out.shape[0] == 3
    torch.testing.assert_close(out[2:], b(x[2:]))
    with pytest.raises(BackendError, match="fixed-size export takes 64x64"):
        b(torch.rand(1, 3, 96, 64))


def test_torchscript_is_shape_generic(files):
    b = DetectBackend(files["torchscript"])
    x = torch.rand(2, 3, 48, 80)
    torch.testing.assert_close(b(x), DetectBackend(files["pt"])(x), rtol=1e-4, atol=1e-4)


def test_input_checks(files):
    b = DetectBackend(files["pt"])
    with pytest.raises(BackendError, match="not a multiple of the stride 16"):
        b(torch.rand(1, 3, 64, 70))
    with pytest.raises(BackendError, match=r"\[B, 3, H, W\]"):
        b(torch.rand(3, 64, 64))


def test_onnx_threads_default_to_physical_cores(files):
    assert 1 <= physical_cores() <= (os.cpu_count() or 1)
    b = DetectBackend(files["onnx"])
    assert b.session.get_session_options().intra_op_num_threads == physical_cores()
    with pytest.raises(BackendError, match="threads must be >= 1"):
        DetectBackend(files["onnx"], threads=-2)


def test_onnx_spin_setting_is_the_callers(files):
    opts = DetectBackend(files["onnx"], threads=2).session.get_session_options()
    assert opts.intra_op_num_threads == 2
    with pytest.raises(RuntimeError):  # never set: ORT's default (spin) applies ...
        opts.get_session_config_entry("session.intra_op.allow_spinning")
    # ... but the threads stop spinning when a run ends, so they leave the cores to NMS and drawing
    assert opts.get_session_config_entry("session.force_spinning_stop") == "1"
    quiet = DetectBackend(files["onnx"], threads=2, spin=False)  # a busy machine: runtime.spin_ok said no
    opts = quiet.session.get_session_options()
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0" and not quiet.spin
    assert quiet.session_config == {"session.intra_op.allow_spinning": "0"}
    x = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(quiet(x), DetectBackend(files["onnx"], threads=1)(x))  # spinning changes no number


def test_pt_backend_never_rewrites_its_model(files):
    b = DetectBackend(files["pt"])
    before = [(name, type(m)) for name, m in b.model.named_modules()]
    params = {k: v.clone() for k, v in b.model.state_dict().items()}
    for shape in ((1, 3, 64, 64), (2, 3, 96, 64)):  # first call, then another shape
        b(torch.rand(*shape))
    assert [(name, type(m)) for name, m in b.model.named_modules()] == before
    assert all(torch.equal(v, params[k]) for k, v in b.model.state_dict().items())
    assert not hasattr(b, "packed") and not hasattr(b, "native")


def test_bad_files_each_give_one_clear_error(files, tmp_path):
    with pytest.raises(BackendError, match="weights file not found"):
        DetectBackend(tmp_path / "missing.pt")
    (tmp_path / "model.h5").write_bytes(b"\x00" * 10)
    with pytest.raises(BackendError, match="unknown weights type '.h5'"):
        DetectBackend(tmp_path / "model.h5")
    for suffix, msg in ((".pt", "not a valid MobileYOLO checkpoint"), (".onnx", "not a valid ONNX model"),
                        (".torchscript", "not a TorchScript model")):
        f = tmp_path / f"junk{suffix}"
        f.write_bytes(b"this is not a model at all" * 5)
        with pytest.raises(BackendError, match=msg) as e:
            DetectBackend(f)
        assert str(f) in str(e.value)
    # a real ONNX graph that was not exported by us: no names/stride metadata
    plain = tmp_path / "plain.onnx"
    torch.onnx.export(nn.Conv2d(3, 3, 1), (torch.zeros(1, 3, 8, 8),), str(plain), dynamo=False, opset_version=17)
    with pytest.raises(BackendError, match="no MobileYOLO metadata"):
        DetectBackend(plain)
    # a torch.save'd dict that is not a checkpoint
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(BackendError, match="missing keys"):
        DetectBackend(tmp_path / "other.pt")


def test_classifier_checkpoint_is_refused(tmp_path):
    from models.yolo import Model
    from models.checkpoint import save_checkpoint

    cls_yaml = {"nc": 3, "depth_multiple": 1.0, "width_multiple": 1.0,
                "backbone": [[-1, 1, "Conv", [8, 3, 2]]], "head": [[-1, 1, "Classify", [3]]]}
    m = Model(cls_yaml)
    save_checkpoint({"model": m.state_dict(), "ema": None, "yaml": m.yaml, "names": ["a", "b", "c"]},
                    tmp_path / "cls.pt")
    with pytest.raises(BackendError, match="classification checkpoint"):
        DetectBackend(tmp_path / "cls.pt")


@pytest.mark.parametrize("suffix,use_torch", [(".pt", True), (".pt", False), (".torchscript", True)])
def test_malicious_pickle_is_refused_without_running_code(tmp_path, suffix, use_torch):
    marker = tmp_path / "pwned.txt"
    evil = write_malicious(tmp_path / f"evil{suffix}", marker, use_torch=use_torch)
    with pytest.raises(BackendError) as e:
        DetectBackend(evil)
    assert str(evil) in str(e.value)
    assert not marker.exists(), "loading the weights ran code from the file"


def test_malicious_payload_really_runs_code_when_unpickled_unsafely(tmp_path):
    # control for the test above: the payload is live, so "marker absent" there means it was refused
    marker = tmp_path / "pwned.txt"
    evil = write_malicious(tmp_path / "evil.pkl", marker, use_torch=False)
    with open(evil, "rb") as f:
        obj = pickle.load(f)  # noqa: S301 - deliberately unsafe, on our own test payload
    obj["model"].close()
    assert marker.exists()


def test_onnx_graph_has_one_output_and_metadata(files):
    g = onnx.load(str(files["onnx"]))
    meta = {p.key: p.value for p in g.metadata_props}
    assert meta["names"] == '["red", "green"]' and meta["stride"] == "16" and meta["imgsz"] == "[64, 64]"
    assert [o.name for o in g.graph.output] == ["output0"]
    assert "BatchNormalization" not in {n.op_type for n in g.graph.node}


# ---- formats (issue 19): dispatch by path, the runners' shared helpers ---------------------------------------
def test_format_of_dispatches_by_suffix_and_folder(tmp_path):
    from utils.infer.backend import format_of

    cases = {"best.pt": "pt", "b.pth": "pt", "best.torchscript": "torchscript", "best.onnx": "onnx",
             "best-int8.onnx": "onnx", "best_openvino_model": "openvino", "m/best.xml": "openvino",
             "best_int8_openvino_model": "openvino", "best_ncnn_model": "ncnn", "model.ncnn.param": "ncnn",
             "best_float32.tflite": "tflite", "best_int8.tflite": "tflite", "best.pte": "executorch",
             "best.h5": None, "somefolder": None}
    assert {k: format_of(k) for k in cases} == cases
    (tmp_path / "plain").mkdir()
    with pytest.raises(BackendError, match="unknown weights type 'plain'.*_openvino_model"):
        DetectBackend(tmp_path / "plain")


@pytest.mark.parametrize("form", ["nchw", "nhwc", "5d"])
def test_decode_maps_equals_our_decoder(form):
    from utils.infer.formats.common import decode_maps
    from utils.ops.decode import decode

    torch.manual_seed(0)
    anchors = torch.tensor([[[10.0, 13.0], [16.0, 30.0]], [[30.0, 61.0], [62.0, 45.0]]])
    strides = torch.tensor([8.0, 16.0])
    meta = export_metadata(NAMES, strides.tolist(), (64, 64), 1, False, anchors=anchors)
    maps5 = [torch.randn(2, 2, 8, 8, 7), torch.randn(2, 2, 4, 4, 7)]  # [B, na, H, W, 5 + nc]
    ref = decode(maps5, anchors, strides).numpy()
    nchw = [m.permute(0, 1, 4, 2, 3).reshape(2, 14, *m.shape[2:4]) for m in maps5]  # the head conv's own layout
    given = {"nchw": nchw, "nhwc": [m.permute(0, 2, 3, 1) for m in nchw], "5d": maps5}[form]
    out = decode_maps([m.numpy() for m in reversed(given)], meta)  # any order: matched by size
    assert out.dtype == torch.zeros(0).numpy().dtype and (out == ref).all()
    with pytest.raises(BackendError, match="not a head map"):
        decode_maps([torch.zeros(1, 5, 8, 8).numpy(), torch.zeros(1, 5, 4, 4).numpy()], meta)
    with pytest.raises(BackendError, match="metadata has no valid 'anchors'"):
        decode_maps([m.numpy() for m in maps5], export_metadata(NAMES, [8.0, 16.0], (64, 64), 1, False))


def test_require_names_the_requirements_file(monkeypatch):
    import sys

    from utils.infer.formats.common import require

    monkeypatch.setitem(sys.modules, "ncnn", None)
    with pytest.raises(BackendError) as e:
        require("ncnn", "NCNN", "best_ncnn_model")
    assert str(e.value) == "best_ncnn_model: NCNN needs ncnn: pip install -r requirements-export.txt"
    assert require("json", "JSON", "x").dumps(1) == "1"
