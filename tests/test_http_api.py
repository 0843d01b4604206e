"""`tsad-agent serve`: real HTTP requests against the server on a free 127.0.0.1 port,
with the shipped DLinear_ad model and the shipped SKAB demo file."""
from __future__ import annotations

import base64
import http.client
import json
import logging
import re
import select
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from agent import __version__
from agent.cli import DEMO_CSV, main
from agent.contract import read_table
from agent.detector import Detector
from agent.http.server import ROUTES, ApiError, load_api_key
from agent.http.service import DEFAULT_STREAM
from agent.prediction import predict
from http_harness import MODEL, call, demo_b64, demo_rows, error_of, read_all, start, stop

KEY = "s3cret-key-for-tests"
T0 = 1.7e9      # 2023-11-14


@pytest.fixture(scope="module")
def server():
    srv = start()
    yield srv
    stop(srv)


@pytest.fixture(scope="module")
def raw_server():
    """Model scaler and threshold (no calibration), so window and stream answers compare."""
    srv = start(calibrate=0, max_streams=3)
    yield srv
    stop(srv)


@pytest.fixture(scope="module")
def keyed_server():
    srv = start(api_key=KEY)
    yield srv
    stop(srv)


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


def test_paddlex_takes_line_wrapped_base64(server):
    """`base64 file.csv` wraps its output at 76 characters (MIME): accepted as is."""
    wrapped = base64.encodebytes(DEMO_CSV.read_bytes()).decode()
    assert "\n" in wrapped
    got = [json.loads(call(server, "POST", "/time-series-anomaly-detection", {"csv": c})[2])
           for c in (wrapped, demo_b64())]
    assert got[0]["errorCode"] == 0 and got[0]["result"] == got[1]["result"]
    assert "not valid base64" in error_of(call(server, "POST", "/time-series-anomaly-detection",
                                               {"csv": "é" + wrapped}), 400)


def test_paddlex_compat_server_returns_last_window(tmp_path):
    srv = start(calibrate=0, compat=True)
    try:
        code, _, body = call(srv, "POST", "/time-series-anomaly-detection", {"csv": demo_b64()})
    finally:
        stop(srv)
    assert code == 200
    got = base64.b64decode(json.loads(body)["result"]["csv"]).decode()
    want = predict(DEMO_CSV, srv.svc.detector, calibrate=0, compat=True).result_csv()
    assert got == want and len(got.splitlines()) == 1 + 64


def test_visualize_returns_png():
    pytest.importorskip("matplotlib", reason="plotting needs the optional [plot] extra")
    srv = start(visualize=True)
    try:
        code, _, body = call(srv, "POST", "/time-series-anomaly-detection", {"csv": demo_b64()})
    finally:
        stop(srv)
    assert code == 200
    assert base64.b64decode(json.loads(body)["result"]["image"])[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- /anomaly
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
                               {"stream": "pump-1", "values": r.tolist(), "ts": T0 + i})[2])
               for i, r in enumerate(rows)]
    assert answers[0] == {"status": "warming_up", "needed": 63}
    assert answers[62] == {"status": "warming_up", "needed": 1}
    for i in (63, 64, 65):
        win = json.loads(call(raw_server, "POST", "/anomaly",
                              {"values": rows[i - 63:i + 1].tolist()})[2])
        assert answers[i]["score"] == pytest.approx(win["score"], rel=1e-5)
        assert answers[i]["status"] == win["status"] and answers[i]["alert"] in ("normal", "anomaly")


def feed(srv, stream: str | None, rows: np.ndarray, t0: float = T0) -> list[dict]:
    """One sample per request on one kept-alive connection; the answers."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=60)
    out = []
    for i, r in enumerate(rows):
        body = {"values": r.tolist(), "ts": t0 + i, **({"stream": stream} if stream else {})}
        conn.request("POST", "/anomaly", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        out.append(json.loads(resp.read()))
    conn.close()
    return out


def test_seed_api_flat_list_learns_then_judges_windows_on_its_baseline(server):
    """`{"values": [v1..vC]}`, the AutoEncoder REST API's own call, is one sample on the
    default stream; a window on that stream is judged against what it learned."""
    rows = demo_rows(402)
    answers = feed(server, None, rows)
    assert answers[0] == {"status": "learning", "needed": 399}
    assert answers[398] == {"status": "learning", "needed": 1}
    learned = answers[399]
    assert learned["status"] == "learned" and learned["needed"] == 1
    thr = learned["threshold"]
    assert set(answers[400]) == {"score", "status", "threshold", "alert"}
    assert answers[400]["threshold"] == thr
    # normal SKAB rows are normal against the learned baseline; against the model's
    # training scaler (the old window mode) they scored 211-321 over a threshold of 1.18
    assert [a["status"] for a in answers[400:]] == ["normal", "normal"]
    for end in (400, 401):
        win = call(server, "POST", "/anomaly", {"stream": DEFAULT_STREAM,
                                                "values": rows[end - 63:end + 1].tolist()})
        doc = json.loads(win[2])
        assert win[0] == 200 and doc["threshold"] == thr and doc["status"] == "normal"
        # judged as the stream scores now (a single window is not smoothed)
        want = server.svc.engine.streams[DEFAULT_STREAM].judge(rows[end - 63:end + 1],
                                                               server.svc.detector.infer)[0]
        assert doc["score"] == pytest.approx(want, rel=1e-5) and doc["score"] < thr
    # the model needs a per-stream baseline: a window without a stream cannot be judged
    msg = error_of(call(server, "POST", "/anomaly", {"values": rows[-64:].tolist()}), 422)
    assert "baseline learned per stream" in msg and "'default'" in msg


def test_window_on_a_learning_or_unknown_stream_is_refused(server):
    feed(server, "young", demo_rows(10))
    win = demo_rows(64).tolist()
    assert error_of(call(server, "POST", "/anomaly", {"stream": "young", "values": win}),
                    422) == "stream young is still learning: 390 samples needed"
    assert "no stream 'ghost': send it samples first" in error_of(
        call(server, "POST", "/anomaly", {"stream": "ghost", "values": win}), 422)
    # judging a window creates no stream and changes none
    assert "ghost" not in server.svc.engine.streams
    assert json.loads(call(server, "POST", "/anomaly", {"stream": "young",
                                                       "values": win[0]})[2])["needed"] == 389


def test_window_without_stream_on_a_model_that_needs_no_baseline(tmp_path):
    from onnx_factory import make_model
    path, meta = make_model(tmp_path / "m.onnx", window=8, channels=["a", "b", "c"],
                            kind="timemix", mean=[1.0, 2.0, 3.0], std=[0.5, 1.0, 2.0],
                            threshold=0.05)
    srv = start(path)
    try:
        win = np.random.default_rng(1).normal(2.0, 1.0, (8, 3)).astype(np.float32)
        code, _, body = call(srv, "POST", "/anomaly", {"values": win.tolist()})
        spec = json.loads(call(srv, "GET", "/openapi.json")[2])
        first = feed(srv, None, win[:1])[0]
    finally:
        stop(srv)
    assert code == 200
    doc = json.loads(body)
    x = (win - np.float32(meta.scaler.mean)) / np.float32(meta.scaler.std)
    recon = srv.svc.detector.infer(x[None])
    want = float(((recon[0, -1].astype(np.float64) - x[-1]) ** 2).mean())
    assert doc["score"] == pytest.approx(want, rel=1e-5) and doc["threshold"] == 0.05
    assert doc["status"] == ("anomaly" if want >= 0.05 else "normal")
    assert "scored with the model's own scaler" in spec["paths"]["/anomaly"]["post"]["description"]
    assert first == {"status": "warming_up", "needed": 7}


def test_stream_limit_is_429(raw_server):
    row = demo_rows(1)[0].tolist()
    codes = [call(raw_server, "POST", "/anomaly", {"stream": f"lim{i}", "values": row})[0]
             for i in range(4)]
    assert codes[-1] == 429 and 200 in codes


SHAPES = "values must be one sample: a list of 8 numbers, or one window: a list of 64 lists"


@pytest.mark.parametrize("body, expect", [
    ({"values": [[0.0] * 8] * 63}, "got 63 list(s) of 8 number(s)"),
    ({"values": [[0.0] * 7] * 64}, "got 64 list(s) of 7 number(s)"),
    ({"values": [["x"] * 8] * 64}, "something other than numbers"),
    ({"values": [[1e39] * 8] * 64}, "within float32 range"),
    ({"values": [10 ** 400] * 8}, "within float32 range"),
    ({"values": [[10 ** 400] + [0.0] * 7] + [[0.0] * 8] * 63}, "within float32 range"),
    ({"values": [0.0] * 3}, "got a list of 3 numbers"),
    ({"values": []}, "got an empty list"),
    ({"values": "1,2,3"}, "got a string"),
    ({"values": None}, "got null"),
    ({"values": {"a": 1}}, "got an object"),
    ({"values": [1.0, [2.0]] * 4}, "got a list holding something other than numbers"),
    ({}, "field 'values' is required"),
    ({"stream": "s", "values": [0.0] * 3}, "got a list of 3 numbers"),
    ({"stream": "s", "values": [[0.0] * 8]}, "got 1 list(s) of 8 number(s)"),
    ({"stream": "bad id!", "values": [0.0] * 8}, "stream must be"),
    ({"stream": "x\n", "values": [0.0] * 8}, "stream must be"),     # not a second "x"
    ({"stream": 7, "values": [0.0] * 8}, "stream must be"),
    ({"stream": None, "values": [0.0] * 8}, "stream must be"),
    ({"stream": "s", "values": [0.0] * 8, "ts": "now"}, "ts must be epoch seconds"),
    ({"stream": "s", "values": [0.0] * 8, "ts": 10 ** 400}, "between 2000 and 2100"),
    ({"stream": "s", "values": [0.0] * 8, "ts": 1000.0}, "between 2000 and 2100"),
    ({"stream": "s", "values": [0.0] * 8, "ts": 4.2e9}, "between 2000 and 2100"),
    ({"stream": "s", "values": [0.0] * 8, "ts": "1999-12-31T23:59:59Z"}, "between 2000"),
    ({"stream": "s", "values": [0.0] * 8, "ts": None}, "between 2000 and 2100; got null"),
    ({"stream": "s", "values": [0.0] * 8, "ts": True}, "got true"),
    ({"stream": "s", "values": [0.0] * 8, "ts": {"a": 1}}, "got an object"),
    ({"stream": "s", "values": [0.0] * 8, "ts": "now"}, 'got "now"'),
    ({"stream": "s", "values": [0.0] * 8, "ts": 10 ** 400}, "got a number beyond float64"),
    (b'{"values": [' + b"7" * 5000 + b', 0, 0, 0, 0, 0, 0, 0]}', "within float32 range"),
    (b'{"values": [0, 0, 0, 0, 0, 0, 0, 0], "ts": -' + b"7" * 5000 + b'}', "beyond float64"),
    ({"values": [[0.0] * 8] * 64, "ts": T0}, "ts belongs to one sample"),
    ([1, 2, 3], "body must be a JSON object, got an array"),
    (b"null", "body must be a JSON object, got null"),
    (b"7", "body must be a JSON object, got a number"),
])
def test_wrong_shapes_are_422(server, body, expect):
    msg = error_of(call(server, "POST", "/anomaly", body), 422)
    assert expect in msg and "sys." not in msg and "None" not in msg
    if "values" in str(body) and "got" in expect and "ts" not in str(body):
        assert msg.startswith(SHAPES), msg


def test_sample_times_in_every_unit_are_accepted(server):
    row = demo_rows(1)[0].tolist()
    for i, ts in enumerate((T0, (T0 + 1) * 1e3, (T0 + 2) * 1e6, int(T0 + 3) * 10 ** 9,
                            "2023-11-14T22:13:24Z", "2023-11-14 22:13:25",
                            "2023-11-14T23:13:26+01:00", str(T0 + 7))):
        code, _, body = call(server, "POST", "/anomaly",
                             {"stream": "times", "values": row, "ts": ts})
        assert code == 200 and json.loads(body)["status"] == "learning", (ts, body)
        assert server.svc.engine.streams["times"].last_ts == pytest.approx(T0 + i, abs=1e-6)
    # an out-of-range time is refused and the stream is unharmed: it goes on learning
    error_of(call(server, "POST", "/anomaly", {"stream": "times", "values": row,
                                                "ts": 1e15 * 1e6}), 422)
    doc = json.loads(call(server, "POST", "/anomaly",
                          {"stream": "times", "values": row, "ts": T0 + 8})[2])
    assert doc == {"status": "learning", "needed": 400 - 9}


def test_bad_json_is_400(server):
    assert "not JSON" in error_of(call(server, "POST", "/anomaly", b"{\"values\": [1,"), 400)
    assert "not valid JSON" in error_of(call(server, "POST", "/anomaly", b"{\"values\": NaN}"), 400)
    assert "not JSON" in error_of(call(server, "POST", "/anomaly", b"\xff\xfe{}"), 400)


def test_healthz(server):
    code, _, body = call(server, "GET", "/healthz")
    assert code == 200
    assert json.loads(body) == {"status": "ok", "model": "DLinear_ad", "ep": "CPUExecutionProvider"}


# ---------------------------------------------------------------- API key
def test_api_key(keyed_server):
    win = {"values": demo_rows(1)[0].tolist()}
    assert "API key" in error_of(call(keyed_server, "POST", "/anomaly", win), 401)
    assert error_of(call(keyed_server, "POST", "/anomaly", win, {"X-API-Key": KEY + "x"}), 401)
    assert error_of(call(keyed_server, "GET", "/metrics", None, {"Authorization": "Basic " + KEY}), 401)
    assert call(keyed_server, "POST", "/anomaly", win, {"X-API-Key": KEY})[0] == 200
    assert call(keyed_server, "POST", "/anomaly", win, {"Authorization": f"Bearer {KEY}"})[0] == 200
    assert call(keyed_server, "GET", "/metrics", None, {"X-API-Key": KEY})[0] == 200
    assert call(keyed_server, "GET", "/healthz")[0] == 200
    # the first non-empty credential counts: an empty X-API-Key does not hide a Bearer
    bearer = {"Authorization": f"Bearer {KEY}"}
    assert call(keyed_server, "POST", "/anomaly", win, {"X-API-Key": "", **bearer})[0] == 200
    assert call(keyed_server, "POST", "/anomaly", win, {"X-API-Key": " ", **bearer})[0] == 200
    assert error_of(call(keyed_server, "POST", "/anomaly", win,
                         {"X-API-Key": "wrong", **bearer}), 401)
    assert error_of(call(keyed_server, "POST", "/anomaly", win, {"X-API-Key": ""}), 401)
    assert error_of(call(keyed_server, "POST", "/anomaly", win, {"Authorization": "Bearer "}), 401)
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


def test_metrics_exposition_format(raw_server):
    call(raw_server, "POST", "/anomaly", b"not json")
    call(raw_server, "POST", "/anomaly", {"values": demo_rows(64).tolist()})
    code, headers, body = call(raw_server, "GET", "/metrics")
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
    assert "tsad_outbox_depth" not in val     # serve has no outbox: only the daemon reports one
    assert val['tsad_http_busy_total{reason="queue"}'] == 0 and val["tsad_http_waiting"] >= 0
    assert val["tsad_http_timeouts_total"] >= 0
    assert val['tsad_build_info{ep="CPUExecutionProvider",model="DLinear_ad",'
               f'version="{__version__}"}}'] == 1
    assert val["process_resident_memory_bytes"] > 0


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
    sample = spec["components"]["schemas"]["SampleRequest"]["properties"]
    assert sample["values"]["minItems"] == sample["values"]["maxItems"] == 8
    assert sample["stream"]["default"] == DEFAULT_STREAM
    assert set(spec["components"]["schemas"]["Pending"]["properties"]["status"]["enum"]) == \
        {"learning", "learned", "warming_up", "skipped"}
    # every status the server answers on a path is documented there
    anomaly = spec["paths"]["/anomaly"]["post"]
    assert {"200", "400", "408", "411", "413", "422", "429", "500", "503"} <= set(anomaly["responses"])
    assert "Retry-After" in anomaly["responses"]["503"]["headers"]
    for ops in spec["paths"].values():
        assert {"408", "431", "503"} <= set(next(iter(ops.values()))["responses"])
    # this server's model needs a per-stream baseline: the document says windows
    # without a stream are refused, as they are
    assert "Without `stream` a window is refused (422)" in anomaly["description"]
    assert "per stream" in error_of(call(server, "POST", "/anomaly",
                                         {"values": demo_rows(64).tolist()}), 422)


# ---------------------------------------------------------------- deadlines
def slow_client(port: int, first: bytes, rest: bytes, pace: float = 1.0) -> tuple[bytes, int]:
    """Send `first` at once, then `rest` a byte every `pace` seconds until the server
    answers or closes; (what it answered, bytes of `rest` sent)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(first)
        for sent, byte in enumerate(rest):
            if select.select([s], [], [], pace)[0]:
                break
            s.sendall(bytes([byte]))
        else:
            sent = len(rest)
        return read_all(s), sent


def test_slowloris_is_cut_off_by_the_deadline_while_others_are_served():
    # one worker: slow and silent clients hold none, it answers the others throughout
    srv = start(calibrate=0, deadline_s=2.0, threads=1)
    port = srv.server_address[1]
    headers = b"Host: x\r\nContent-Type: application/json\r\nX-Pad: " + b"a" * 40 + b"\r\n\r\n"
    slow = {
        # headers at a byte a second
        "headers": (b"POST /anomaly HTTP/1.1\r\nContent-Length: 2\r\n", headers),
        # the body at a byte a second
        "body": (b"POST /anomaly HTTP/1.1\r\nContent-Length: 40\r\n\r\n", b"{" + b" " * 39),
        # the request line at a byte a second
        "line": (b"PO", b"ST /anomaly HTTP/1.1\r\n" + headers),
        # not a byte: closed without an answer
        "silent": (b"", b""),
    }
    with ThreadPoolExecutor(len(slow)) as ex:
        futures = {k: ex.submit(slow_client, port, *v) for k, v in slow.items()}
        others = []
        while not all(f.done() for f in futures.values()):
            others.append(call(srv, "GET", "/healthz")[0])
            time.sleep(0.2)
        got = {k: f.result() for k, f in futures.items()}
    metrics = call(srv, "GET", "/metrics")[2].decode()
    stop(srv)
    for k in ("headers", "body", "line"):
        data, sent = got[k]
        assert data.startswith(b"HTTP/1.1 408 "), (k, data)
        doc = json.loads(data.partition(b"\r\n\r\n")[2])
        assert doc["errorCode"] == 408 and "within 2 s" in doc["errorMsg"]
        assert sent < len(slow[k][1]), k    # cut off, not waited for
    assert got["silent"] == (b"", 0)
    # the other clients were answered all along (each waiting ~2 s for a worker held
    # by a slow client would leave room for two or three calls)
    assert len(others) >= 6 and set(others) == {200}
    assert "tsad_http_timeouts_total 4.0" in metrics.splitlines()
    # each 408 sent is a request answered too, whoever sent it (a worker, or the watcher
    # for a head cut off: its path was never read)
    answered = sum(float(ln.rsplit(" ", 1)[1]) for ln in metrics.splitlines()
                   if ln.startswith('tsad_http_requests_total{code="408"'))
    assert answered == 3


def test_window_that_overflows_once_scaled_is_422_never_nan(raw_server):
    win = demo_rows(64)
    win[-1] = 3e38
    msg = error_of(call(raw_server, "POST", "/anomaly", {"values": win.tolist()}), 422)
    assert "overflow float32 once scaled" in msg
    # the sample form takes such a sample as missing, as the daemon does: no NaN either
    # (on pump-1, after a gap: this server's three streams may all be taken)
    answers = feed(raw_server, "pump-1", np.vstack([demo_rows(64), win[-1:]]), T0 + 1000)
    assert "score" in answers[-1] and all(np.isfinite(a.get("score", 0.0)) for a in answers)


def test_idle_streams_are_evicted_so_new_ids_are_taken_again():
    srv = start(calibrate=0, max_streams=2, idle_evict_s=0.5)
    row = demo_rows(1)[0].tolist()
    try:
        codes = [call(srv, "POST", "/anomaly", {"stream": f"job{i}", "values": row})[0]
                 for i in range(3)]
        assert codes == [200, 200, 429]
        time.sleep(1.2)     # idle past idle_evict_s, and past the once-a-second look
        assert call(srv, "POST", "/anomaly", {"stream": "job2", "values": row})[0] == 200
        assert set(srv.svc.engine.streams) == {"job2"}
    finally:
        stop(srv)


def test_window_judged_with_the_scaler_its_stream_scaled_its_newest_sample_with():
    """Adaptation scales a sample with the version of LAG epochs before: a window is
    judged with that one, so (unsmoothed) it scores what the stream scored."""
    from agent.engine import Engine
    from agent.jobs import detection_config, model_learning_rows, run_table
    det = Detector(str(MODEL))
    t = read_table("../shared/data/skab/valve1/1.csv", det.meta.channels)
    over = {"scoring": {"smoothing": 1}}
    eng = Engine(detection_config(det.meta, model_learning_rows(det.meta), over, node="t"), det)
    last = float(run_table(eng, "s", t.ts, t.values).table("s")["score"][-1])
    st = eng.streams["s"]
    assert st.adapter is not None and st.adapter.version > 2
    assert st.judge(t.values[-64:], det.infer)[0] == pytest.approx(last, rel=0.02)


def test_openapi_lists_every_answer_the_server_sends_on_every_path(server):
    spec = json.loads(call(server, "GET", "/openapi.json")[2])
    for path, want in ROUTES.items():
        wrong = "GET" if want == "POST" else "POST"
        code, headers, _ = call(server, wrong, path, b"" if wrong == "POST" else None)
        assert code == 405 and headers["Allow"] == want
        responses = spec["paths"][path][want.lower()]["responses"]
        assert {"400", "405", "505"} <= set(responses) and "Allow" in responses["405"]["headers"]
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=30) as s:
        s.sendall(b"GET /healthz HTTP/2.0\r\n\r\n")
        assert read_all(s).startswith(b"HTTP/1.1 505 ")


def test_a_request_line_with_control_characters_is_logged_escaped(server, caplog):
    """The request line is the client's text: in the log it cannot move a terminal's
    cursor nor start a journal entry of its own."""
    with caplog.at_level(logging.DEBUG, logger="tsad.http"):
        with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=30) as s:
            s.sendall(b"GET /\x1b[2J\x1b[31mFAKE HTTP/1.1\r\nConnection: close\r\n\r\n")
            assert read_all(s).startswith(b"HTTP/1.1 404 ")
        deadline = time.monotonic() + 10
        while "FAKE" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
    line = next(r.getMessage() for r in caplog.records if "FAKE" in r.getMessage())
    assert "\x1b" not in line and "/\\x1b[2J\\x1b[31mFAKE" in line
