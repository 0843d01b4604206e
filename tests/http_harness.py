"""The in-process `tsad-agent serve` for tests: a real server on a free 127.0.0.1
port, real HTTP requests, the shipped DLinear_ad model and SKAB demo file.

    srv = start(calibrate=0, threads=2)     # service and server keywords
    code, headers, body = call(srv, "GET", "/healthz")
    stop(srv)
"""
from __future__ import annotations

import base64
import http.client
import json
import socket
import threading

import numpy as np
import pytest

from agent.cli import DEMO_CSV
from agent.contract import read_table
from agent.http.server import make_server
from agent.model_meta import load_meta
from conftest import MODELS

MODEL = MODELS / "DLinear_ad.onnx"


def start(model=MODEL, **kw):
    if not model.exists():
        pytest.skip(f"shipped model {model} not built")
    srv = make_server(str(model), host="127.0.0.1", port=0, **kw)
    srv.thread = threading.Thread(target=srv.serve_forever, daemon=True)
    srv.thread.start()
    return srv


def stop(srv) -> None:
    srv.shutdown()
    srv.server_close()
    srv.thread.join(5)


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


def read_all(s: socket.socket) -> bytes:
    """Everything the server sends until it closes."""
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def demo_rows(n: int) -> np.ndarray:
    return read_table(DEMO_CSV, load_meta(MODEL).channels).values[:n]


def demo_b64() -> str:
    return base64.b64encode(DEMO_CSV.read_bytes()).decode()
