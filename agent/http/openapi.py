"""The OpenAPI 3 document served at GET /openapi.json, built from the loaded model.

Generated rather than stored so the window and channel count in the schemas
always match the model the server runs.
"""
from __future__ import annotations

from .. import __version__
from ..model_meta import ModelMeta

PADDLEX_PATH = "/time-series-anomaly-detection"


def _json(schema_ref: str, description: str) -> dict:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema_ref}"}}}}


def _errors(*codes: int) -> dict:
    text = {400: "Body is not JSON, or `csv` is not base64", 401: "API key missing or wrong",
            404: "Unknown path", 405: "Method not allowed on this path",
            411: "Content-Length missing (chunked bodies are not accepted)",
            413: "Body over the size limit", 422: "Well-formed JSON of the wrong shape, or "
            "a CSV that cannot be predicted on (missing columns, irregular timestamps, too few rows)",
            429: "Too many named streams", 500: "Internal error (details in the server log)"}
    return {str(c): _json("Error", text[c]) for c in codes}


def build_spec(meta: ModelMeta, ep: str, max_body: int, auth: bool) -> dict:
    w, c = meta.window, meta.n_channels
    row = {"type": "array", "items": {"type": "number"}, "minItems": c, "maxItems": c,
           "description": f"one sample: {c} values in channel order {meta.channels}"}
    secured = [{"ApiKey": []}, {"Bearer": []}] if auth else []
    protected = {"security": secured} if auth else {}
    auth_err = (401,) if auth else ()
    return {
        "openapi": "3.0.3",
        "info": {"title": "tsad-agent HTTP API", "version": __version__,
                 "description": f"Model {meta.name} ({meta.architecture}), window {w}, "
                                f"{c} channels, on {ep}. Bodies up to {max_body} bytes. "
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
                              **_errors(400, *auth_err, 411, 413, 422, 500)}}},
            "/anomaly": {"post": {
                "operationId": "anomaly",
                "summary": "Score one window, or append one sample to a named stream",
                **protected,
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "oneOf": [{"$ref": "#/components/schemas/WindowRequest"},
                              {"$ref": "#/components/schemas/StreamRequest"}]}}}},
                "responses": {"200": {"description": "A score, or how many samples are still needed",
                                      "content": {"application/json": {"schema": {"oneOf": [
                                          {"$ref": "#/components/schemas/AnomalyResult"},
                                          {"$ref": "#/components/schemas/Pending"}]}}}},
                              **_errors(400, *auth_err, 411, 413, 422, 429, 500)}}},
            "/healthz": {"get": {
                "operationId": "healthz", "summary": "Liveness; never needs the API key",
                "responses": {"200": {"description": "Up", "content": {"application/json": {
                    "schema": {"type": "object", "required": ["status", "model", "ep"],
                               "properties": {"status": {"type": "string", "enum": ["ok"]},
                                              "model": {"type": "string"},
                                              "ep": {"type": "string"}}}}}}}}},
            "/metrics": {"get": {
                "operationId": "metrics", "summary": "Prometheus text exposition format 0.0.4",
                **protected,
                "responses": {"200": {"description": "Counters, histogram, gauges",
                                      "content": {"text/plain": {"schema": {"type": "string"}}}},
                              **_errors(*auth_err)}}},
            "/openapi.json": {"get": {
                "operationId": "openapi", "summary": "This document; never needs the API key",
                "responses": {"200": {"description": "OpenAPI 3 document",
                                      "content": {"application/json": {"schema": {"type": "object"}}}}}}},
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
                "WindowRequest": {"type": "object", "required": ["values"], "properties": {
                    "values": {"type": "array", "items": row, "minItems": w, "maxItems": w,
                               "description": f"{w} samples, oldest first; scaled with the "
                                              "model's scaler, scored against its threshold"}}},
                "StreamRequest": {"type": "object", "required": ["stream", "values"], "properties": {
                    "stream": {"type": "string", "pattern": "^[A-Za-z0-9_.\\-]{1,64}$"},
                    "values": row,
                    "ts": {"type": "number", "description": "epoch seconds; default: arrival time"}}},
                "AnomalyResult": {"type": "object", "required": ["score", "status", "threshold"],
                                  "properties": {
                    "score": {"type": "number"},
                    "status": {"type": "string", "enum": ["normal", "anomaly"]},
                    "threshold": {"type": "number"},
                    "channels": {"type": "array", "description": "top channels by error share",
                                 "items": {"type": "object", "properties": {
                                     "name": {"type": "string"}, "share": {"type": "number"}}}},
                    "alert": {"type": "string", "enum": ["normal", "anomaly"],
                              "description": "stream form: the alert state (hysteresis)"}}},
                "Pending": {"type": "object", "required": ["status", "needed"], "properties": {
                    "status": {"type": "string", "enum": ["learning", "warming_up", "skipped"]},
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
