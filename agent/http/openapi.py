"""The OpenAPI 3 document served at GET /openapi.json, built from the loaded model.

Generated rather than stored so the window and channel count in the schemas
always match the model the server runs.
"""
from __future__ import annotations

from .. import __version__
from ..model_meta import ModelMeta
from .service import DEFAULT_STREAM

PADDLEX_PATH = "/time-series-anomaly-detection"


def _json(schema_ref: str, description: str) -> dict:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema_ref}"}}}}


_ERROR_TEXT = {
    400: "Bad request: a request line without an HTTP version, a Content-Length that is "
         "not digits only or two that differ; on POST a body that is not JSON or a `csv` "
         "that is not base64", 401: "API key missing or wrong",
    404: "Unknown path", 405: "Method not allowed on this path (Allow names the one that is)",
    408: "Request (line, headers and body) not received within the request deadline",
    411: "Content-Length missing (chunked bodies are not accepted)",
    413: "Body over the size limit", 422: "Well-formed JSON that cannot be used: wrong "
    "shape, numbers outside float32, a `ts` outside 2000-2100, a window no baseline can "
    "judge yet (the message says why and what to send), or a CSV that cannot be predicted "
    "on (missing columns, irregular timestamps, too few rows)",
    429: "Too many named streams",
    431: "Request head (request line and headers) over 16 KiB", 500: "Internal error (details in the server log)",
    503: "Server busy (all workers busy and their wait queue full, or too many open "
         "connections): retry after Retry-After seconds",
    505: "HTTP version other than 1.0 and 1.1"}
# answered on every path, whatever the operation: the request line, head and connection
EVERY_PATH = (400, 405, 408, 431, 503, 505)


def _errors(*codes: int) -> dict:
    out = {str(c): _json("Error", _ERROR_TEXT[c]) for c in sorted({*codes, *EVERY_PATH})}
    out["405"]["headers"] = {"Allow": {"description": "the method this path accepts",
                                       "schema": {"type": "string"}}}
    if "503" in out:
        out["503"]["headers"] = {"Retry-After": {"description": "seconds to wait",
                                                 "schema": {"type": "integer"}}}
    return out


def _window_rule(model_scaler_ok: bool) -> str:
    if model_scaler_ok:
        return ("Without `stream` a window is scored with the model's own scaler and "
                "threshold.")
    return ("Without `stream` a window is refused (422) on this server: the model "
            "judges data against a baseline learned per stream.")


def build_spec(meta: ModelMeta, ep: str, limits: dict[str, int], auth: bool,
               model_scaler_ok: bool = True) -> dict:
    """limits: the body size limit of each POST path; model_scaler_ok: windows without
    a stream are scored with the model's scaler (`service.AnomalyService.model_scaler_ok`)."""
    w, c = meta.window, meta.n_channels
    row = {"type": "array", "items": {"type": "number"}, "minItems": c, "maxItems": c,
           "description": f"one sample: {c} values in channel order {meta.channels}"}
    secured = [{"ApiKey": []}, {"Bearer": []}] if auth else []
    protected = {"security": secured} if auth else {}
    auth_err = (401,) if auth else ()
    stream_id = {"type": "string", "pattern": "^[A-Za-z0-9_.\\-]{1,64}$"}
    return {
        "openapi": "3.0.3",
        "info": {"title": "tsad-agent HTTP API", "version": __version__,
                 "description": f"Model {meta.name} ({meta.architecture}), window {w}, "
                                f"{c} channels, on {ep}. Bodies up to "
                                + ", ".join(f"{n} bytes on {p}" for p, n in limits.items())
                                + ". "
                                "Every error is {logId, errorCode (= HTTP status), errorMsg}."},
        "paths": {
            PADDLEX_PATH: {"post": {
                "operationId": "infer",
                "summary": "PaddleX serving contract: label the rows of a CSV file",
                "description": "Same labels as `tsad-agent predict` with the server's settings. "
                               "URLs are not fetched (the device is offline): send the file.",
                **protected,
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/PaddlexRequest"}}}},
                "responses": {"200": _json("PaddlexResponse", "Labels as a base64 CSV"),
                              **_errors(400, *auth_err, 408, 411, 413, 422, 431, 500, 503)}}},
            "/anomaly": {"post": {
                "operationId": "anomaly",
                "summary": "Append one sample to a stream, or score one window",
                "description": "The shape of `values` decides: C numbers are one sample "
                               "(SampleRequest), W lists of C numbers one window "
                               "(WindowRequest); anything else is 422. A window with "
                               "`stream` is judged against that stream's learned baseline "
                               "(422 while it is unknown or still learning): the "
                               "scaler it applied to its newest sample, its threshold, "
                               "and the newest step's score, unsmoothed; where the "
                               "model's policy smooths a stream's scores (and fitted its "
                               "threshold on them) the sample form is the stream's own "
                               "judgement and may differ near the threshold. "
                               + _window_rule(model_scaler_ok),
                **protected,
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "oneOf": [{"$ref": "#/components/schemas/SampleRequest"},
                              {"$ref": "#/components/schemas/WindowRequest"}]}}}},
                "responses": {"200": {"description": "A score, or how many samples are still needed",
                                      "content": {"application/json": {"schema": {"oneOf": [
                                          {"$ref": "#/components/schemas/AnomalyResult"},
                                          {"$ref": "#/components/schemas/Pending"}]}}}},
                              **_errors(400, *auth_err, 408, 411, 413, 422, 429, 431, 500, 503)}}},
            "/healthz": {"get": {
                "operationId": "healthz", "summary": "Liveness; never needs the API key",
                "responses": {"200": {"description": "Up", "content": {"application/json": {
                    "schema": {"type": "object", "required": ["status", "model", "ep"],
                               "properties": {"status": {"type": "string", "enum": ["ok"]},
                                              "model": {"type": "string"},
                                              "ep": {"type": "string"}}}}}},
                              **_errors(408, 431, 503)}}},
            "/metrics": {"get": {
                "operationId": "metrics", "summary": "Prometheus text exposition format 0.0.4",
                **protected,
                "responses": {"200": {"description": "Counters, histogram, gauges",
                                      "content": {"text/plain": {"schema": {"type": "string"}}}},
                              **_errors(*auth_err, 408, 431, 503)}}},
            "/openapi.json": {"get": {
                "operationId": "openapi", "summary": "This document; never needs the API key",
                "responses": {"200": {"description": "OpenAPI 3 document",
                                      "content": {"application/json": {"schema": {"type": "object"}}}},
                              **_errors(408, 431, 503)}}},
        },
        "components": {
            "securitySchemes": {"ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                                "Bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "PaddlexRequest": {"type": "object", "required": ["csv"], "properties": {
                    "csv": {"type": "string", "format": "byte",
                            "description": "base64 of a CSV file: a time column "
                                           "(timestamp/datetime/time) and the model's channels"}}},
                "PaddlexResponse": {"type": "object",
                                    "required": ["logId", "errorCode", "errorMsg", "result"],
                                    "properties": {
                    "logId": {"type": "string", "format": "uuid"},
                    "errorCode": {"type": "integer", "enum": [0]},
                    "errorMsg": {"type": "string", "enum": ["Success"]},
                    "result": {"type": "object", "required": ["csv", "image"], "properties": {
                        "csv": {"type": "string", "format": "byte",
                                "description": "base64 of `timestamp,label` CSV"},
                        "image": {"type": "string", "format": "byte", "nullable": True,
                                  "description": "base64 PNG (server run with --visualize), else null"}}}}},
                "SampleRequest": {"type": "object", "required": ["values"], "properties": {
                    "values": row,
                    "stream": {**stream_id, "default": DEFAULT_STREAM,
                               "description": "the stream the sample is appended to"},
                    "ts": {"oneOf": [{"type": "number"}, {"type": "string"}],
                           "description": "sample time: epoch seconds, ms, µs or ns (told "
                                          "apart by magnitude) or ISO 8601 (UTC without a "
                                          "zone), between 2000 and 2100; default: arrival "
                                          "time"}}},
                "WindowRequest": {"type": "object", "required": ["values"],
                                  "not": {"required": ["ts"]}, "properties": {
                    "values": {"type": "array", "items": row, "minItems": w, "maxItems": w,
                               "description": f"{w} samples, oldest first; scored as sent, "
                                              "no stream state changes"},
                    "stream": {**stream_id, "description": "judge against this stream's "
                                                           "learned scaler and threshold"}}},
                "AnomalyResult": {"type": "object", "required": ["score", "status", "threshold"],
                                  "properties": {
                    "score": {"type": "number"},
                    "status": {"type": "string", "enum": ["normal", "anomaly"]},
                    "threshold": {"type": "number"},
                    "channels": {"type": "array", "description": "window form: top channels "
                                                                 "by error share",
                                 "items": {"type": "object", "properties": {
                                     "name": {"type": "string"}, "share": {"type": "number"}}}},
                    "alert": {"type": "string", "enum": ["normal", "anomaly"],
                              "description": "sample form: the stream's alert state "
                                             "(hysteresis)"}}},
                "Pending": {"type": "object", "required": ["status", "needed"], "properties": {
                    "status": {"type": "string",
                               "enum": ["learning", "learned", "warming_up", "skipped"],
                               "description": "learning: the stream's baseline is being "
                                              "learned; learned: this sample ended that "
                                              "period; warming_up: the window is filling; "
                                              "skipped: the window holds a gap"},
                    "threshold": {"type": "number",
                                  "description": "with learned: the threshold learned"},
                    "needed": {"type": "integer", "nullable": True,
                               "description": "samples still needed before the next score "
                                              "(null: the learning period is set by time)"}}},
                "Error": {"type": "object", "required": ["logId", "errorCode", "errorMsg"],
                          "properties": {"logId": {"type": "string"},
                                         "errorCode": {"type": "integer"},
                                         "errorMsg": {"type": "string"}}},
            },
        },
    }
