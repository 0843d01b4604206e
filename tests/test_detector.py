"""Detector: loading checks, provider fallback and batched inference on real ONNX models."""
from __future__ import annotations

import json
import logging

import numpy as np
import onnxruntime as ort
import pytest
from onnx_factory import make_model, reseal, timemix_matrix

from agent.detector import Detector, DetectorError
from agent.metrics import Metrics
from agent.model_meta import meta_path_for
from agent.providers import PROVIDERS, resolve

W, C = 12, 4


@pytest.fixture
def timemix(tmp_path):
    return make_model(tmp_path / "tm.onnx", window=W, channels=C, kind="timemix")


def windows(n, seed=1):
    return np.random.default_rng(seed).normal(size=(n, W, C)).astype(np.float32)


def test_resolve_keeps_installed_in_order_cpu_last(caplog):
    caplog.set_level(logging.WARNING, logger="agent.providers")
    chain = resolve(["cpu", "openvino", "bogus", "cuda"])
    names = [p for p, _ in chain]
    assert names[-1] == "CPUExecutionProvider" and names.count("CPUExecutionProvider") == 1
    available = ort.get_available_providers()
    assert names[:-1] == [PROVIDERS[k] for k in ("openvino", "cuda") if PROVIDERS[k] in available]
    assert "unknown name" in caplog.text and "tried last" in caplog.text
    for k in ("openvino", "cuda"):
        if PROVIDERS[k] not in available:
            assert f"{k!r} skipped" in caplog.text
    assert all(isinstance(o, dict) for _, o in chain)


def test_fallback_to_cpu_is_logged(timemix, caplog):
    path, _ = timemix
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available or "OpenVINOExecutionProvider" in available:
        pytest.skip("this machine has an accelerator provider; fallback is not exercised")
    caplog.set_level(logging.WARNING)
    det = Detector(str(path), providers=["openvino", "cuda", "cpu"])
    assert det.ep == "CPUExecutionProvider"
    assert "'openvino' skipped" in caplog.text and "'cuda' skipped" in caplog.text


def test_infer_matches_the_graph_and_batching_is_invisible(timemix):
    path, _ = timemix
    m = Metrics()
    det = Detector(str(path), max_batch=7, metrics=m)
    x = windows(30)
    y = det.infer(x)
    assert y.shape == x.shape and y.dtype == np.float32
    np.testing.assert_allclose(y, np.einsum("ts,bsc->btc", timemix_matrix(W), x), rtol=1e-5, atol=1e-5)
    one_by_one = np.concatenate([det.infer(x[i:i + 1]) for i in range(len(x))])
    np.testing.assert_allclose(y, one_by_one, rtol=1e-6, atol=1e-6)
    # 30 windows in chunks of 7 -> 5 runs, then 30 single-window runs
    assert len(m._lat_ms) == 5 + 30
    assert det.infer(x[:0]).shape == (0, W, C)


def test_fixed_batch_of_one_loops(tmp_path):
    path, _ = make_model(tmp_path / "fixed.onnx", window=W, channels=C, kind="timemix", batch=1)
    det = Detector(str(path))
    assert det.fixed_batch == 1
    x = windows(9)
    np.testing.assert_allclose(det.infer(x), np.einsum("ts,bsc->btc", timemix_matrix(W), x),
                               rtol=1e-5, atol=1e-5)


def test_fixed_batch_pads_last_chunk(tmp_path):
    path, _ = make_model(tmp_path / "fixed4.onnx", window=W, channels=C, batch=4, scale=2.0, bias=0.0)
    det = Detector(str(path))
    x = windows(10)
    np.testing.assert_allclose(det.infer(x), 2.0 * x, rtol=1e-6)


def test_tampered_file_is_refused_with_sha256(timemix):
    path, _ = timemix
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(DetectorError, match="sha256"):
        Detector(str(path))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_unloadable_model_with_matching_checksum(timemix, damage):
    path, _ = timemix
    blob = path.read_bytes()
    path.write_bytes({"truncate": blob[: len(blob) // 3], "garbage": b"\x00not onnx at all" * 20,
                      "empty": b""}[damage])
    reseal(path)
    with pytest.raises(DetectorError, match="not a loadable ONNX model") as e:
        Detector(str(path))
    assert "\n" not in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize("graph_kw,what", [({"graph_window": W + 1}, "window"),
                                            ({"graph_channels": C - 1}, "channels")])
def test_shape_mismatch_between_graph_and_metadata(tmp_path, graph_kw, what):
    path, _ = make_model(tmp_path / "mm.onnx", window=W, channels=C, **graph_kw)
    with pytest.raises(DetectorError, match=f"metadata says {what}"):
        Detector(str(path))


def test_wrong_io_names(tmp_path):
    path, _ = make_model(tmp_path / "names.onnx", window=W, channels=C, input_name="inp")
    meta = meta_path_for(path)
    meta.write_text(meta.read_text().replace('"input_name": "inp"', '"input_name": "x"'))
    with pytest.raises(DetectorError, match="no input 'x'.*inp"):
        Detector(str(path))


def test_missing_metadata_and_model(tmp_path, timemix):
    path, _ = timemix
    meta_path_for(path).unlink()
    with pytest.raises(DetectorError, match="metadata not found"):
        Detector(str(path))
    with pytest.raises(DetectorError, match="model file not found"):
        Detector(str(tmp_path / "nope.onnx"))


def test_checksum_can_be_skipped(timemix):
    path, _ = timemix
    # an appended ModelProto.doc_string field: a different hash, still a valid model
    path.write_bytes(path.read_bytes() + b"\x32\x03abc")
    with pytest.raises(DetectorError, match="sha256"):
        Detector(str(path))
    assert Detector(str(path), verify_checksum=False).ep == "CPUExecutionProvider"


def test_bad_input_shape_is_a_clear_error(timemix):
    det = Detector(str(timemix[0]))
    with pytest.raises(ValueError, match=rf"\[B, {W}, {C}\]"):
        det.infer(np.zeros((2, W, C + 1), np.float32))


def test_a_detector_serves_a_model_section_only_while_nothing_it_is_made_of_changed(timemix):
    from msgspec.structs import replace
    from agent.config import ModelConfig
    path, _ = timemix
    cfg = ModelConfig(path=str(path))
    det = Detector.from_config(cfg)
    assert det.serves(cfg)
    assert det.serves(replace(cfg, batch_wait_s=0.5, policy=False))   # not the session's
    assert not det.serves(replace(cfg, max_batch=8))
    assert not det.serves(replace(cfg, threads=2))
    assert not Detector(str(path)).serves(cfg)         # not built from a config section
    # a session on a fallback: a reload retries the provider asked for first
    det.preferred_ep = "CUDAExecutionProvider"
    assert not det.serves(cfg)
    det.preferred_ep = det.ep
    # the metadata edited (a new threshold), then the model file rewritten
    meta = meta_path_for(path)
    text = meta.read_text()
    edited = json.loads(text)
    edited["threshold"]["value"] *= 1.5
    meta.write_text(json.dumps(edited))
    assert not det.serves(cfg)
    meta.write_text(text)
    assert det.serves(cfg)
    path.write_bytes(path.read_bytes() + b"\0")
    assert not det.serves(cfg)
    path.unlink()
    assert not det.serves(cfg)


def test_a_model_with_external_data_is_refused_wherever_the_process_runs(tmp_path, monkeypatch):
    """Its weights would come from files the sha256 does not cover, looked for from the
    working directory (/ under the unit): any file there could stand in for them."""
    import onnx
    path, _ = make_model(tmp_path / "ext.onnx", window=W, channels=C, kind="timemix")
    m = onnx.load(str(path))
    onnx.save(m, str(path), save_as_external_data=True, location="weights.bin",
              size_threshold=0)
    reseal(path)
    for cwd in (tmp_path, tmp_path.parent):           # beside its weights, and elsewhere
        monkeypatch.chdir(cwd)
        with pytest.raises(DetectorError, match="keeps weights in external data files, which "
                                                "its sha256 does not cover"):
            Detector(str(path))
