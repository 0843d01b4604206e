"""A model whose run fails on one stream's sample, through the real agent process and a real
Mosquitto (ORT audit, twenty-second session): the daemon died with every stream, and the
samples the broker kept for its session killed it again at the restart.  Now that stream's
windows are dropped and counted, and the others, an open alert among them, go on."""
from __future__ import annotations

import os

import pytest
import yaml

from agent_harness import (MOSQUITTO, JsonDevice, Publisher, Rig, json_stream, no_traceback,
                           wait_until)
from onnx_factory import make_model

pytestmark = pytest.mark.skipif(not os.path.exists(MOSQUITTO), reason="mosquitto not installed")

WINDOW = 8
QUIET, FAULT = {"a": 0, "b": 0, "c": 0, "d": 0}, {"a": 1000, "b": 0, "c": 0, "d": 0}
FAILS = {"a": 0, "b": 9, "c": 0, "d": 0}        # b over 5 fails the run


def test_a_failing_model_run_drops_one_streams_windows_and_the_daemon_goes_on(tmp_path):
    model, _ = make_model(tmp_path / "glitch.onnx", window=WINDOW, channels=list("abcd"),
                          kind="glitch", trigger=5.0, threshold=1.0)
    rig = Rig(tmp_path, wait_online=False,
              streams=[json_stream(sid, f"dev/{sid}") for sid in ("x", "y")])
    cfg = yaml.safe_load(rig.config.read_text())
    cfg["model"]["path"] = str(model)
    rig.config.write_text(yaml.safe_dump(cfg))
    devs = []
    try:
        agent = rig.agent()
        agent.wait_log("subscribed to", n=2)
        pub = Publisher(rig.broker.port)     # one client: a second with its id would evict it
        devs = [pub]
        x, y = JsonDevice(pub, "dev/x"), JsonDevice(pub, "dev/y")
        y.send(WINDOW + 2, FAULT)
        wait_until(lambda: [a["type"] for a in rig.obs.alerts()] == ["new"], "y's alert")
        x.send(WINDOW, QUIET)
        x.send(1, FAILS)
        agent.wait_log("its windows are dropped, judged by nothing")
        x.send(WINDOW + 2, QUIET)
        y.send(3, FAULT)
        h = wait_until(lambda: (h := rig.obs.healths()) and h[-1][1]["samples_in"] == x.i + y.i
                       and h[-1][1], "health with every sample")
        assert agent.running()
        assert h["errors"].get("inference", 0) >= 1
        assert h["streams"]["x"]["state"] == "normal" and h["streams"]["y"]["state"] == "anomaly"
        assert [a["type"] for a in rig.obs.alerts() if a["type"] != "update"] == ["new"]
        assert "[E:onnxruntime" not in agent.log()      # ORT's own unthrottled line
        no_traceback(agent)
    finally:
        for d in devs:
            d.close()
        rig.close()
