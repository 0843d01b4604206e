"""`tsad-agent serve`: real HTTP requests against the server on a free 127.0.0.1 port,
with the shipped DLinear_ad model and the shipped SKAB demo file."""
from __future__ import annotations

import base64
import http.client
import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from agent.cli import DEMO_CSV, main
from agent.detector import Detector
from agent.http.server import ROUTES, ApiError, load_api_key, make_server
from agent.prediction import predict
from agent.contract import read_table
from conftest import MODELS

MODEL = MODELS / "DLinear_ad.onnx"
KEY = "s3cret-key-for-tests"


def start(**kw):
    if not MODEL.exists():
        pytest.skip(f"shipped model {MODEL} not built")
    srv = make_server(str(MODEL), host="127.0.0.1", port=0, **kw)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    return srv, t


@pytest.fixture(scope="module")
def server():
    srv, t = start()
    yield srv
    srv.shutdown()
    srv.server_close()
    t.join(5)


@pytest.fixture(scope="module")
def raw_server():
    """Model scaler and threshold (no calibration), so window and stream answers compare."""
    srv, t = start(calibrate=0, max_streams=3)
    yield srv
    srv.shutdown()
    srv.server_close()
    t.join(5)


@pytest.fixture(scope="module")
def keyed_server():
    srv, t = start(api_key=KEY)
    yield srv
    srv.shutdown()
    srv.server_close()
    t.join(5)


def call(srv, method: str, path: str, body=None, headers: dict | None = None):
    """(status, headers, body bytes); dict bodies are sent as JSON."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=60)
    data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    conn.request(method, path, body=data, headers=headers or {})
    r = conn.getresponse()
    out = r.status, dict(r.getheaders()), r.read()
    conn.close()
    return out


def error_of(resp, status: int) -> str:
    code, _, body = resp
    assert code == status, body
    doc = json.loads(body)
    assert doc["errorCode"] == status and set(doc) == {"logId", "errorCode", "errorMsg"}
    assert "Traceback" not in doc["errorMsg"]
    return doc["errorMsg"]


def demo_b64() -> str:
    return base64.b64encode(DEMO_CSV.read_bytes()).decode()


# ---------------------------------------------------------------- PaddleX endpoint
def test_paddlex_round_trip_matches_predict_cli(server, tmp_path):
    code, _, body = call(server, "POST", "/time-series-anomaly-detection", {"csv": demo_b64()})
    assert code == 200
    doc = json.loads(body)
    assert doc["errorCode"] == 0 and doc["errorMsg"] == "Success" and doc["result"]["image"] is None
    assert re.fullmatch(r"[0-9a-f-]{36}", doc["logId"])
    got = base64.b64decode(doc["result"]["csv"]).decode()
    assert main(["predict", "--input", str(DEMO_CSV), "--model", str(MODEL),
                 "--save_path", str(tmp_path)]) == 0
    assert got == (tmp_path / f"{DEMO_CSV.stem}_res.csv").read_text()
    lines = got.splitlines()
    assert lines[0] == "timestamp,label" and lines[1].startswith("2020-03-09 10:34:33,")
    assert len(lines) - 1 == len(read_table(DEMO_CSV, Detector(str(MODEL)).meta.channels).ts)
    assert "1" in {l.rsplit(",", 1)[1] for l in lines[1:]}


def test_paddlex_errors(server):
    assert "not valid base64" in error_of(
        call(server, "POST", "/time-series-anomaly-detection", {"csv": "@@not base64@@"}), 400)
    assert "does not fetch URLs" in error_of(
        call(server, "POST", "/time-series-anomaly-detection",
             {"csv": "https://example.com/x.csv"}), 422)
    assert "'csv'" in error_of(call(server, "POST", "/time-series-anomaly-detection", {}), 422)
    msg = error_of(call(server, "POST", "/time-series-anomaly-detection",
                        {"csv": base64.b64encode(b"timestamp,Current\n1,2\n").decode()}), 422)
    assert msg.startswith("csv: missing column(s) ['Accelerometer1RMS'") and "/tmp" not in msg


def test_paddlex_compat_server_returns_last_window(tmp_path):
    srv, t = start(calibrate=0, compat=True)
    try:
        code, _, body = call(srv, "POST", "/time-series-anomaly-detection", {"csv": demo_b64()})
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(5)
    assert code == 200
    got = base64.b64decode(json.loads(body)["result"]["csv"]).decode()
    want = predict(DEMO_CSV, srv.svc.detector, calibrate=0, compat=True).result_csv()
    assert got == want and len(got.splitlines()) == 1 + 64


def test_visualize_returns_png():
    pytest.importorskip("matplotlib", reason="plotting needs the optional [plot] extra")
    srv, t = start(visualize=True)
    try:
        code, _, body = call(srv, "POST", "/time-series-anomaly-detection", {"csv": demo_b64()})
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(5)
    assert code == 200
    assert base64.b64decode(json.loads(body)["result"]["image"])[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- /anomaly
def demo_rows(n: int) -> np.ndarray:
    values = read_table(DEMO_CSV, Detector(str(MODEL)).meta.channels).values
    return values[:n]


def test_window_score_matches_detector(raw_server):
    win = demo_rows(64)
    code, _, body = call(raw_server, "POST", "/anomaly", {"values": win.tolist()})
    assert code == 200
    doc = json.loads(body)
    det = raw_server.svc.detector
    x = (win - np.float32(det.meta.scaler.mean)) / np.float32(det.meta.scaler.std)
    recon = det.infer(x[None].astype(np.float32))
    want = float(((recon[0, -1].astype(np.float64) - x[-1].astype(np.float64)) ** 2).mean())
    assert doc["score"] == pytest.approx(want, rel=1e-5)
    assert doc["threshold"] == det.meta.threshold.value
    assert doc["status"] == ("anomaly" if want >= doc["threshold"] else "normal")


def test_stream_warms_up_then_scores_like_a_window(raw_server):
    rows = demo_rows(66)
    answers = [json.loads(call(raw_server, "POST", "/anomaly",
                               {"stream": "pump-1", "values": r.tolist(), "ts": 1000.0 + i})[2])
               for i, r in enumerate(rows)]
    assert answers[0] == {"status": "warming_up", "needed": 63}
    assert answers[62] == {"status": "warming_up", "needed": 1}
    for i in (63, 64, 65):
        win = json.loads(call(raw_server, "POST", "/anomaly",
                              {"values": rows[i - 63:i + 1].tolist()})[2])
        assert answers[i]["score"] == pytest.approx(win["score"], rel=1e-5)
        assert answers[i]["status"] == win["status"] and answers[i]["alert"] in ("normal", "anomaly")


def test_stream_limit_is_429(raw_server):
    row = demo_rows(1)[0].tolist()
    codes = [call(raw_server, "POST", "/anomaly", {"stream": f"lim{i}", "values": row})[0]
             for i in range(4)]
    assert codes[-1] == 429 and 200 in codes


@pytest.mark.parametrize("body, expect", [
    ({"values": [[0.0] * 8] * 63}, "must be [64 x 8]"),
    ({"values": [[0.0] * 7] * 64}, "must be [64 x 8]"),
    ({"values": [["x"] * 8] * 64}, "lists of numbers"),
    ({"values": [[1e39] * 8] * 64}, "finite"),
    ({"stream": "s", "values": [0.0] * 3}, "must be [1 x 8]"),
    ({"stream": "s", "values": [[0.0] * 8]}, "ONE sample"),
    ({"stream": "bad id!", "values": [0.0] * 8}, "stream must be"),
    ({"stream": "s", "values": [0.0] * 8, "ts": "now"}, "ts must be a number"),
    ([1, 2, 3], "JSON object"),
])
def test_wrong_shapes_are_422(server, body, expect):
    assert expect in error_of(call(server, "POST", "/anomaly", body), 422)


def test_bad_json_is_400(server):
    assert "not JSON" in error_of(call(server, "POST", "/anomaly", b"{\"values\": [1,"), 400)
    assert "not valid JSON" in error_of(call(server, "POST", "/anomaly", b"{\"values\": NaN}"), 400)
    assert "not JSON" in error_of(call(server, "POST", "/anomaly", b"\xff\xfe{}"), 400)


# ---------------------------------------------------------------- HTTP rules
def test_oversized_body_is_413_without_reading_it(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    conn.putrequest("POST", "/time-series-anomaly-detection")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(9 << 20))
    conn.endheaders(b"{\"csv\": \"")
    r = conn.getresponse()
    assert r.status == 413 and r.getheader("Connection") == "close"
    assert "over the 8388608-byte limit" in json.loads(r.read())["errorMsg"]
    conn.close()


def test_missing_length_unknown_path_wrong_method(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    conn.putrequest("POST", "/anomaly")
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 411
    conn.close()
    assert "no such path" in error_of(call(server, "GET", "/nope"), 404)
    code, headers, _ = call(server, "GET", "/anomaly")
    assert code == 405 and headers["Allow"] == "POST"
    assert call(server, "DELETE", "/healthz")[0] == 405
    code, _, body = call(server, "HEAD", "/healthz")
    assert code == 200 and body == b""


def test_keep_alive_serves_several_requests_on_one_connection(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    for _ in range(3):
        conn.request("GET", "/healthz")
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["status"] == "ok"
    conn.close()


def test_healthz(server):
    code, _, body = call(server, "GET", "/healthz")
    assert code == 200
    assert json.loads(body) == {"status": "ok", "model": "DLinear_ad", "ep": "CPUExecutionProvider"}


# ---------------------------------------------------------------- API key
def test_api_key(keyed_server):
    win = {"values": demo_rows(64).tolist()}
    assert "API key" in error_of(call(keyed_server, "POST", "/anomaly", win), 401)
    assert error_of(call(keyed_server, "POST", "/anomaly", win, {"X-API-Key": KEY + "x"}), 401)
    assert error_of(call(keyed_server, "GET", "/metrics", None, {"Authorization": "Basic " + KEY}), 401)
    assert call(keyed_server, "POST", "/anomaly", win, {"X-API-Key": KEY})[0] == 200
    assert call(keyed_server, "POST", "/anomaly", win, {"Authorization": f"Bearer {KEY}"})[0] == 200
    assert call(keyed_server, "GET", "/metrics", None, {"X-API-Key": KEY})[0] == 200
    assert call(keyed_server, "GET", "/healthz")[0] == 200
    spec = json.loads(call(keyed_server, "GET", "/openapi.json")[2])
    assert spec["paths"]["/anomaly"]["post"]["security"] == [{"ApiKey": []}, {"Bearer": []}]


def test_api_key_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("TSAD_TEST_KEY", " k1 \n")
    assert load_api_key(env="TSAD_TEST_KEY") == "k1"
    (tmp_path / "key").write_text("k2\n")
    assert load_api_key(file=str(tmp_path / "key")) == "k2"
    monkeypatch.delenv("TSAD_TEST_KEY")
    with pytest.raises(ApiError, match="TSAD_TEST_KEY is not set"):
        load_api_key(env="TSAD_TEST_KEY")
    with pytest.raises(ApiError, match="cannot read API key file"):
        load_api_key(file=str(tmp_path / "nope"))
    assert load_api_key() is None


# ---------------------------------------------------------------- metrics, OpenAPI
SAMPLE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\\n]|\\[\\"n])*",?)*\})? '
                    r'(-?[0-9.eE+-]+|\+Inf|-Inf|NaN)$')
COMMENT = re.compile(r"^# (HELP [a-zA-Z_:][a-zA-Z0-9_:]* .*|TYPE [a-zA-Z_:][a-zA-Z0-9_:]* "
                     r"(counter|gauge|histogram|summary|untyped))$")


def test_metrics_exposition_format(server):
    call(server, "POST", "/anomaly", b"not json")
    call(server, "POST", "/anomaly", {"values": demo_rows(64).tolist()})
    code, headers, body = call(server, "GET", "/metrics")
    assert code == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    assert text.endswith("\n")
    for line in text.splitlines():
        assert SAMPLE.match(line) or COMMENT.match(line), line
    val = {l.rsplit(" ", 1)[0]: float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
           if not l.startswith("#")}
    assert val['tsad_malformed_total{reason="http_json"}'] >= 1
    assert val["tsad_samples_total"] >= 64 and val["tsad_windows_total"] >= 1
    buckets = [v for k, v in val.items() if k.startswith("tsad_inference_seconds_bucket")]
    assert buckets == sorted(buckets) and buckets[-1] == val["tsad_inference_seconds_count"] >= 1
    assert val["tsad_outbox_depth"] == 0
    assert val['tsad_build_info{version="0.1.0",model="DLinear_ad",ep="CPUExecutionProvider"}'] == 1


def test_openapi_document(server):
    code, _, body = call(server, "GET", "/openapi.json")
    assert code == 200
    spec = json.loads(body)
    assert spec["openapi"].startswith("3.")
    assert {p: next(iter(ops)).upper() for p, ops in spec["paths"].items()} == ROUTES
    refs = re.findall(r'"\$ref": "#/components/schemas/([A-Za-z]+)"', body.decode())
    assert refs and set(refs) <= set(spec["components"]["schemas"])
    win = spec["components"]["schemas"]["WindowRequest"]["properties"]["values"]
    assert win["minItems"] == win["maxItems"] == 64 and win["items"]["maxItems"] == 8


# ---------------------------------------------------------------- concurrency
def test_concurrent_requests(server):
    win = {"values": demo_rows(64).tolist()}
    alone = json.loads(call(server, "POST", "/anomaly", win)[2])
    want_csv = json.loads(call(server, "POST", "/time-series-anomaly-detection",
                               {"csv": demo_b64()})[2])["result"]["csv"]

    def one(i):
        if i % 8 == 0:
            code, _, body = call(server, "POST", "/time-series-anomaly-detection", {"csv": demo_b64()})
            return code, json.loads(body)["result"]["csv"] == want_csv
        code, _, body = call(server, "POST", "/anomaly", win)
        return code, json.loads(body)["score"] == alone["score"]

    with ThreadPoolExecutor(12) as ex:
        results = list(ex.map(one, range(48)))
    assert results == [(200, True)] * 48


# ---------------------------------------------------------------- the CLI daemon
def test_serve_command_runs_and_stops_on_sigterm(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from conftest import REPO, free_port, wait_port
    if not MODEL.exists():
        pytest.skip(f"shipped model {MODEL} not built")
    port = free_port()
    env = {**os.environ, "TSAD_KEY": KEY}
    p = subprocess.Popen([sys.executable, "-m", "agent.cli", "serve", "--model", str(MODEL),
                          "--port", str(port), "--api-key-env", "TSAD_KEY"], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_port(port, 60)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/metrics")
        assert conn.getresponse().status == 401
        conn.close()
    finally:
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=30)
    assert p.returncode == 0, out
    assert f"http://127.0.0.1:{port}" in out and "API key required" in out


def test_serve_command_refuses_an_unset_key(capsys):
    assert main(["serve", "--model", str(MODEL), "--api-key-env", "TSAD_SURELY_UNSET_VAR"]) == 1
    assert capsys.readouterr().err.strip() == \
        "error: API key variable TSAD_SURELY_UNSET_VAR is not set or empty"


def test_garbage_request_line_gets_a_json_400(server):
    import socket
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=30) as s:
        s.sendall(b"THIS IS NOT HTTP\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") or head.startswith(b"HTTP/1.0 400"), head
    assert json.loads(body)["errorCode"] == 400
