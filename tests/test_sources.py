"""Source plug-ins against real parts: pseudo-terminals, a real mosquitto, SKAB files."""
from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
import tty
from pathlib import Path

import numpy as np
import pandas as pd
import paho.mqtt.client as paho
import pytest

from agent.config import StreamConfig
from agent.config_build import build
from agent.mqtt_client import MqttConfig
from agent.metrics import Metrics
from agent.contract import read_table
from agent.sources import SOURCES, build_source
from agent.sources.base import Batch, decode_items

CH = ["a", "b", "c"]
SKAB_CH = ["Accelerometer1RMS", "Accelerometer2RMS", "Current", "Pressure", "Temperature",
           "Thermocouple", "Voltage", "Volume Flow RateRMS"]
WAIT = 15.0   # generous: only bounds how long a broken test hangs
T = 1_700_000_000            # device timestamps: T + k


def wait_for(cond, timeout=WAIT, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Runner:
    """Runs a source in a thread and collects what it emits, decoded on the taking thread
    as the pipeline decodes it."""

    def __init__(self, source):
        self.source = source
        self.batches: "queue.Queue[Batch]" = queue.Queue()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self):
        try:
            self.source.run(self.batches.put, self.stop)
        except BaseException as e:   # surfaced by the test
            self.error = e
        finally:
            self.source.close()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "source did not stop"
        assert self.error is None, self.error

    def take(self, n_samples: int) -> list[Batch]:
        got, n = [], 0
        end = time.monotonic() + WAIT
        while n < n_samples:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"got {n} of {n_samples} samples: {got}")
            try:
                item = self.batches.get(timeout=left)
            except queue.Empty:
                continue
            for b in decode_items([item]):
                got.append(b)
                n += len(b)
        return got


def stream(id_, **source) -> StreamConfig:
    return build(StreamConfig, {"id": id_, "source": source})


def samples(batches):
    ts = np.concatenate([b.ts for b in batches])
    v = np.concatenate([b.values for b in batches])
    return ts, v


def test_registry_names_every_source():
    assert set(SOURCES) == {"serial", "mqtt", "replay"}


# ---------------------------------------------------------------- serial
def open_pty():
    master, slave = os.openpty()
    tty.setraw(slave)        # no echo, no CR/LF translation: bytes arrive as written
    return master, slave, os.ttyname(slave)


@contextlib.contextmanager
def serial_on_pty(m: Metrics, **source):
    """A serial source (stream s1) reading a fresh pty, running and open: (the pty's master
    end to write to, the source, its runner); the pty is closed after the runner stops."""
    master, slave, name = open_pty()
    src = build_source(stream("s1", type="serial", port=name, **source), CH, m, MqttConfig(), "n")
    try:
        with Runner(src) as r:
            wait_for(lambda: src.connected, what="serial open")
            yield master, src, r
    finally:
        os.close(master)
        os.close(slave)


def test_serial_lines_partial_reads_and_garbage():
    m = Metrics()
    with serial_on_pty(m, baud=9600) as (master, src, r):
        os.write(master, f"{T + 1},1,2,3\r\n{T + 2},4,".encode())
        time.sleep(0.05)                      # the line is split across two reads
        os.write(master, b"5,6\n\xff\xfe garbage\r\n" + f"{T + 3},7\n{T + 4},9,9,9\n".encode())
        got = r.take(3)
    ts, v = samples(got)
    assert all(b.stream == "s1" and b.values.dtype == np.float32 for b in got)
    np.testing.assert_array_equal(ts, [T + 1, T + 2, T + 4])
    np.testing.assert_array_equal(v, [[1, 2, 3], [4, 5, 6], [9, 9, 9]])
    assert m.malformed["non_utf8"] == 1 and m.malformed["field_count"] == 1
    assert src.connected is False


def test_line_splitter_byte_by_byte():
    from agent.decoders import LineDecoder
    from agent.sources.serial import LineSplitter
    m = Metrics()
    sp = LineSplitter(LineDecoder(CH, "csv", "auto", m, "t"))
    stream_bytes = b"1,2,3\r\n\r\n4,5,6\r7,8,9\n" + b"x" * 70_000 + b"\n10,11,12\n"
    lines = [ln for i in range(len(stream_bytes)) for ln in sp.feed(stream_bytes[i:i + 1])]
    assert lines == [b"1,2,3", b"4,5,6", b"7,8,9", b"10,11,12"]
    assert m.malformed["too_long"] == 1


def test_serial_stop_interrupts_an_idle_read():
    with serial_on_pty(Metrics()) as (_, _, r):
        pass
    assert not r.thread.is_alive()      # __exit__ joined it after stop


def test_serial_absent_port_then_unplug_and_replug(tmp_path):
    link = tmp_path / "ttyTEST"
    m = Metrics()
    src = build_source(stream("s1", type="serial", port=str(link), reconnect_min_s=0.05,
                              reconnect_max_s=0.2, timestamp="first"), CH, m, MqttConfig(), "n")
    seen_down = threading.Event()
    with Runner(src) as r:
        time.sleep(0.3)                      # absent at start: retried, not fatal
        assert r.thread.is_alive() and not src.connected
        ma, sa, name_a = open_pty()
        os.symlink(name_a, link)
        wait_for(lambda: src.connected, what="connect to pty A")
        os.write(ma, f"{T + 1},1,1,1\n".encode())
        assert samples(r.take(1))[0].tolist() == [T + 1]

        watcher = threading.Thread(target=lambda: (wait_for(lambda: not src.connected,
                                                            what="unplug noticed"),
                                                   seen_down.set()), daemon=True)
        watcher.start()
        os.close(ma)                         # unplug: the slave now reads EIO
        os.close(sa)
        watcher.join(WAIT)
        assert seen_down.is_set()

        mb, sb, name_b = open_pty()          # replug: new device node, same configured path
        link.unlink()
        os.symlink(name_b, link)
        wait_for(lambda: src.connected, what="reconnect to pty B")
        os.write(mb, f"{T + 2},2,2,2\n{T + 3},3,3,3\n".encode())
        ts, v = samples(r.take(2))
        np.testing.assert_array_equal(ts, [T + 2, T + 3])
        np.testing.assert_array_equal(v, [[2, 2, 2], [3, 3, 3]])
    os.close(mb)
    os.close(sb)


def test_serial_overlong_run_without_newline_is_dropped_once():
    m = Metrics()
    with serial_on_pty(m, timestamp="first") as (master, _, r):
        junk = b"7" * 4096
        for _ in range(40):              # 160 KiB without a line end
            os.write(master, junk)
        os.write(master, f"\n{T + 5},1,2,3\n".encode())
        ts, v = samples(r.take(1))
    np.testing.assert_array_equal(ts, [T + 5])
    assert m.malformed["too_long"] == 1


def test_serial_opened_mid_line_learns_the_timestamp_from_the_lines_after():
    """`timestamp: auto` (the serial default), port opened while the device is mid-line:
    the torn tail of a timestamped line has exactly C fields, as a line without a
    timestamp would; it must neither lock the stream to "no timestamp" nor be a sample."""
    m = Metrics()
    with serial_on_pty(m) as (master, _, r):
        os.write(master, b"662,0.0391254,32.0012\n")       # "...1700000000.662,..."
        for k in range(1, 6):
            os.write(master, f"{T + k},{k},2,3\n".encode())
            time.sleep(0.02)                # line by line, as a device sends them
        ts, v = samples(r.take(5))
    np.testing.assert_array_equal(ts, [T + k for k in range(1, 6)])
    np.testing.assert_array_equal(v, [[k, 2, 3] for k in range(1, 6)])
    assert m.malformed == {"field_count": 1}


def test_serial_auto_without_timestamps_still_reads_every_line():
    m = Metrics()
    with serial_on_pty(m) as (master, _, r):
        before = time.time()
        for k in range(1, 6):
            os.write(master, f"{k},2,3\n".encode())
            time.sleep(0.02)
        ts, v = samples(r.take(5))
    np.testing.assert_array_equal(v, [[k, 2, 3] for k in range(1, 6)])
    assert before <= ts[0] and np.all(np.diff(ts) > 0) and ts[-1] <= time.time()  # arrival
    assert m.malformed == {}


# ---------------------------------------------------------------- mqtt
def publisher(broker):
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="test-pub")
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    return c


def test_mqtt_wildcard_topic_feeds_two_streams(broker):
    m = Metrics()
    cfg = MqttConfig(port=broker.port)
    src = build_source(stream("plant", type="mqtt", topic="plant/+/sensors", stream_from_topic=1,
                              qos=1), CH, m, cfg, "node1")
    pub = publisher(broker)
    try:
        with Runner(src) as r:
            wait_for(lambda: src.connected, what="mqtt subscribe")   # set on SUBACK
            # pump2's clock is 8 s behind pump1's: each stream is checked against its own
            pub.publish("plant/pump1/sensors", b'{"ts": 1700000010, "values": [1, 2, 3]}', qos=1).wait_for_publish(WAIT)
            pub.publish("plant/pump1/sensors", b"not json", qos=1).wait_for_publish(WAIT)
            pub.publish("plant/pump2/sensors",
                        b'[{"ts": 1700000002, "values": {"a": 4, "b": 5, "c": 6}}, {"ts": 1700000003, "values": [7, 8, 9]}]',
                        qos=1).wait_for_publish(WAIT)
            pub.publish("plant/pump1/other", b'{"ts": 1700000009, "values": [0, 0, 0]}', qos=1).wait_for_publish(WAIT)
            got = r.take(3)
        by_stream = {}
        for b in got:
            by_stream.setdefault(b.stream, []).append(b)
        assert set(by_stream) == {"pump1", "pump2"}
        np.testing.assert_array_equal(samples(by_stream["pump1"])[1], [[1, 2, 3]])
        ts2, v2 = samples(by_stream["pump2"])
        np.testing.assert_array_equal(ts2, [T + 2, T + 3])
        np.testing.assert_array_equal(v2, [[4, 5, 6], [7, 8, 9]])
        assert m.malformed["bad_json"] == 1
        assert src.connected is False
    finally:
        pub.loop_stop()
        pub.disconnect()


def test_mqtt_absent_broker_at_start_and_broker_restart(broker, caplog):
    broker.stop()
    cfg = MqttConfig(port=broker.port)
    src = build_source(stream("pump7", type="mqtt", topic="dev/pump7", protocol="csv"), CH,
                       Metrics(), cfg, "node1")
    with Runner(src) as r:
        time.sleep(0.5)
        assert r.thread.is_alive() and not src.connected
        broker.start()
        wait_for(lambda: src.connected, timeout=40, what="subscribed after broker start")
        pub = publisher(broker)
        try:
            # three lines: a `timestamp: auto` stream decides on three that agree
            pub.publish("dev/pump7", f"{T + 4},0,0,0\n{T + 5},1,2,3\n{T + 6},4,5,6\n",
                        qos=1).wait_for_publish(WAIT)
            got = r.take(3)
        finally:
            pub.loop_stop()
            pub.disconnect()
        # a broker restart without persistence forgets the subscription: it must be renewed
        broker.stop()
        wait_for(lambda: not src.connected, what="disconnect noticed")
        assert any("disconnected from broker" in r.getMessage() for r in caplog.records
                   if r.levelno == logging.WARNING), "a lost broker is a warning"
        broker.start()
        wait_for(lambda: src.connected, timeout=40, what="resubscribed after restart")
        pub = publisher(broker)
        try:
            pub.publish("dev/pump7", f"{T + 7},1,2,3", qos=1).wait_for_publish(WAIT)
            got += r.take(1)
        finally:
            pub.loop_stop()
            pub.disconnect()
    assert {b.stream for b in got} == {"pump7"}
    np.testing.assert_array_equal(samples(got)[0], [T + 4, T + 5, T + 6, T + 7])


def test_mqtt_csv_first_message_without_timestamp_does_not_lock_the_stream(broker):
    """MQTT CSV is always `timestamp: auto`: a device whose first message lacks the
    timestamp (sent before its clock was set, say) and whose later ones carry it."""
    m = Metrics()
    src = build_source(stream("pump7", type="mqtt", topic="dev/pump7", protocol="csv"), CH, m,
                       MqttConfig(port=broker.port), "node1")
    pub = publisher(broker)
    try:
        with Runner(src) as r:
            wait_for(lambda: src.connected, what="mqtt subscribe")
            pub.publish("dev/pump7", b"9,9,9", qos=1).wait_for_publish(WAIT)
            for k in range(1, 6):
                pub.publish("dev/pump7", f"{T + k},{k},2,3", qos=1).wait_for_publish(WAIT)
            got = r.take(5)
    finally:
        pub.loop_stop()
        pub.disconnect()
    ts, v = samples(got)
    np.testing.assert_array_equal(ts, [T + k for k in range(1, 6)])
    np.testing.assert_array_equal(v, [[k, 2, 3] for k in range(1, 6)])
    assert m.malformed == {"field_count": 1}


def test_mqtt_clean_stop_is_not_a_lost_broker(broker, caplog):
    src = build_source(stream("pump7", type="mqtt", topic="dev/pump7", protocol="csv"), CH,
                       Metrics(), MqttConfig(port=broker.port), "node1")
    with caplog.at_level(logging.INFO, logger="tsad.source.mqtt"):
        with Runner(src):
            wait_for(lambda: src.connected, what="mqtt subscribe")
        time.sleep(0.3)     # paho's disconnect callback runs on its own thread
    assert not src.connected
    assert any("subscribed to" in r.getMessage() for r in caplog.records)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_mqtt_oversize_payload_is_refused_unread_and_counted(broker):
    from agent.decoders import MAX_PAYLOAD
    m = Metrics()
    src = build_source(stream("pump7", type="mqtt", topic="dev/pump7", protocol="csv"), CH, m,
                       MqttConfig(port=broker.port), "node1")
    r, emitted = Runner(src), []
    put = r.batches.put
    r.batches.put = lambda item: (emitted.append(item), put(item))
    with r:
        wait_for(lambda: src.connected, what="mqtt subscribe")
        pub = publisher(broker)
        try:
            pub.publish("dev/pump7", b"1," * (MAX_PAYLOAD // 2) + b"1", qos=1).wait_for_publish(WAIT)
            pub.publish("dev/pump7", f"{T + 1},1,2,3\n{T + 2},4,5,6\n{T + 3},7,8,9",
                        qos=1).wait_for_publish(WAIT)
            got = r.take(3)
        finally:
            pub.loop_stop()
            pub.disconnect()
    assert m.malformed["too_long"] == 1
    np.testing.assert_array_equal(samples(got)[1], [[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    assert max(len(item.payload) for item in emitted) < 100, "queued whole, not refused"


# ---------------------------------------------------------------- replay
def _cols(t):
    return t.ts, t.values, t.labels


def test_read_table_skab_selects_channels_by_name(skab_dir):
    path = skab_dir / "valve1" / "0.csv"
    ts, v, labels = _cols(read_table(path, ["Pressure", "Current"]))
    assert v.shape == (len(ts), 2) and v.dtype == np.float32 and v.flags.c_contiguous
    assert ts.dtype == np.float64 and np.all(np.diff(ts) > 0)
    assert ts[0] == pytest.approx(1583748870.0)   # 2020-03-09 10:14:30 as UTC
    raw = path.read_text().splitlines()[1].split(";")
    assert v[0].tolist() == pytest.approx([float(raw[4]), float(raw[3])])
    assert labels is not None and labels.dtype == np.int8 and set(np.unique(labels)) == {0, 1}
    _, _, none = _cols(read_table(skab_dir / "anomaly-free" / "anomaly-free.csv", SKAB_CH))
    assert none is None


def test_read_table_missing_column_names_it(skab_dir):
    with pytest.raises(ValueError, match=r"missing column\(s\) \['Flow'\]"):
        read_table(skab_dir / "valve1" / "0.csv", ["Current", "Flow"])


def test_read_table_plain_csv_variants(tmp_path):
    p = tmp_path / "plain.csv"
    p.write_text("c,a,b\n3,1,2\n6,4,x\n")
    ts, v, labels = _cols(read_table(p, CH))
    np.testing.assert_array_equal(ts, [0, 1])            # no time column: 1 s steps
    np.testing.assert_array_equal(v, np.array([[1, 2, 3], [4, np.nan, 6]], np.float32))
    assert labels is None
    p.write_text("timestamp,a,b,c,anomaly\n100.5,1,2,3,0\n101.5,1,2,3,1\n")
    ts, _, labels = _cols(read_table(p, CH))
    np.testing.assert_array_equal(ts, [100.5, 101.5])
    np.testing.assert_array_equal(labels, [0, 1])
    p.write_text("time,a,b,c\n2020-01-01T00:00:00Z,1,2,3\nlater,1,2,3\n")
    with pytest.raises(ValueError, match="row 2"):
        read_table(p, CH)


EPOCH_S = [1583750073, 1583750074.5, 1583750076]     # 2020-03-09, as SKAB


@pytest.mark.parametrize("scale", [1, 1_000, 1_000_000, 1_000_000_000], ids=["s", "ms", "us", "ns"])
def test_read_table_epoch_units_are_told_apart_by_magnitude(tmp_path, scale):
    p = tmp_path / "epoch.csv"
    stamps = EPOCH_S if scale == 1 else [int(t * scale) for t in EPOCH_S]
    p.write_text("timestamp;a;b;c\n" + "".join(f"{t};1;2;3\n" for t in stamps))
    assert read_table(p, CH).ts.tolist() == EPOCH_S      # the same seconds in every unit


@pytest.mark.parametrize("cells, row, why", [
    (["1583750073", "-5"], 2, "-5: a number must be epoch"),          # negative epoch
    (["-1000", "-999"], 1, "-1000: a number must be epoch"),           # negative from the start
    (["1583750073", "55840000000"], 2, "55840000000: a number"),       # between s and ms
    (["1583750073", "1583750074", "1e30"], 3, "1e+30: a number"),
    (["1583750073", ""], 2, "nan: a number"),                           # an empty cell
    (["0", "1583750073"], 1, "0: a number"),               # a count from 0, then an epoch
    (["2020-01-01T00:00:00Z", "3000-01-01T00:00:00Z"], 2, "'3000-01-01T00:00:00Z': outside"),
    (["1899-12-31 23:59:59", "2020-01-01 00:00:00"], 1, "'1899-12-31 23:59:59': outside"),
])
def test_read_table_times_out_of_range_name_file_column_and_row(tmp_path, cells, row, why):
    p = tmp_path / "bad_times.csv"
    p.write_text("time,a,b,c\n" + "".join(f"{c},1,2,3\n" for c in cells))
    with pytest.raises(ValueError) as e:
        read_table(p, CH)
    msg = str(e.value)
    assert msg.startswith(f"{p}: column 'time': row {row} has no readable timestamp ("), msg
    assert why in msg


def test_read_table_refuses_rows_out_of_time_order_and_keeps_a_clocks_jitter(tmp_path):
    p = tmp_path / "times.csv"
    # 0.5 s back and a repeated time: jitter a daemon's decoder accepts too
    p.write_text("time,a,b,c\n10,1,2,3\n11,1,2,3\n10.5,1,2,3\n10.5,1,2,3\n12,1,2,3\n")
    assert read_table(p, CH).ts.tolist() == [10, 11, 10.5, 10.5, 12]
    # a 10 Hz file newest first: each step is within the jitter, but the rows fall
    # further and further behind the first one
    p.write_text("time,a,b,c\n" + "".join(f"{100 - k / 10:.1f},1,2,3\n" for k in range(30)))
    with pytest.raises(ValueError) as e:
        read_table(p, CH)
    assert str(e.value).startswith(f"{p}: column 'time': row 12 (98.9) is 1.1 s before row 1 "
                                   "(100.0), more than the 1 s of jitter allowed; 19 such "
                                   "row(s). Rows must be in time order"), e.value


@pytest.mark.parametrize("cells, first", [
    (["12/03/2020 10:00:00", "13/03/2020 10:00:00"], "2020-03-12T10:00:00"),    # day first
    (["03/12/2020 10:00:00", "03/13/2020 10:00:00"], "2020-03-12T10:00:00"),    # month first
    (["12.03.2020 10:00", "13.03.2020 10:00"], "2020-03-12T10:00:00"),          # dotted
])
def test_read_table_tells_day_first_dates_from_month_first(tmp_path, cells, first):
    p = tmp_path / "dates.csv"
    p.write_text("time,a,b,c\n" + "".join(f"{c},1,2,3\n" for c in cells))
    assert str(pd.to_datetime(read_table(p, CH).ts[0], unit="s").isoformat()) == first


def test_read_table_refuses_dates_that_read_either_way(tmp_path):
    p = tmp_path / "dates.csv"
    p.write_text("time,a,b,c\n01/03/2020 10:00:00,1,2,3\n02/03/2020 10:00:00,1,2,3\n")
    with pytest.raises(ValueError, match=r"row 1 \('01/03/2020 10:00:00'\) and every other date "
                                         r"can be read day first or month first"):
        read_table(p, CH)


def test_read_table_date_text_of_a_plants_older_history_is_read(tmp_path):
    p = tmp_path / "old.csv"
    p.write_text("time,a,b,c\n1998-06-01 00:00:00,1,2,3\n1998-06-01 00:00:01,1,2,3\n")
    assert read_table(p, CH).ts.tolist() == [896659200.0, 896659201.0]


def test_read_table_relative_times_are_kept_as_they_are(tmp_path):
    # PaddleX's integer time index, or seconds since a recording began
    p = tmp_path / "steps.csv"
    p.write_text("timestamp,a,b,c\n" + "".join(f"{k},1,2,3\n" for k in range(4)))
    assert read_table(p, CH).ts.tolist() == [0, 1, 2, 3]


def test_replay_source_full_speed_and_loop(skab_dir):
    path = skab_dir / "valve1" / "1.csv"
    ts_file, v_file, _ = _cols(read_table(path, SKAB_CH))
    n = len(ts_file)
    src = build_source(stream("r", type="replay", path=str(path), chunk=100, loop=True),
                       SKAB_CH, Metrics(), MqttConfig(), "n")
    with Runner(src) as r:
        got = r.take(2 * n + 1)
    assert max(len(b) for b in got) == 100
    ts, v = samples(got)
    np.testing.assert_array_equal(v[:n], v_file)
    np.testing.assert_array_equal(v[n:2 * n], v_file)       # second pass, same values
    assert np.all(np.diff(ts[:2 * n]) > 0)                  # the looped clock keeps going


def test_replay_source_ends_without_loop_and_real_time_batches(tmp_path):
    p = tmp_path / "r.csv"
    p.write_text("timestamp,a,b,c\n" + "".join(f"{t / 100},{t},{t},{t}\n" for t in range(5)))
    src = build_source(stream("r", type="replay", path=str(p), speed=1.0), CH, Metrics(),
                       MqttConfig(), "n")
    stop = threading.Event()
    out: list[Batch] = []
    src.run(out.append, stop)                               # returns at the end of the file
    assert [len(b) for b in out] == [1] * 5
    np.testing.assert_array_equal(samples(out)[0], [0, 0.01, 0.02, 0.03, 0.04])
    assert src.connected is False


def test_replay_stop_interrupts_a_long_wait(tmp_path):
    p = tmp_path / "slow.csv"
    p.write_text("timestamp,a,b,c\n0,1,1,1\n3600,2,2,2\n")  # an hour between rows
    src = build_source(stream("r", type="replay", path=str(p), speed=1.0), CH, Metrics(),
                       MqttConfig(), "n")
    with Runner(src) as r:
        assert len(r.take(1)) == 1


def test_replay_bad_file_fails_at_build(tmp_path):
    with pytest.raises(OSError):
        build_source(stream("r", type="replay", path=str(tmp_path / "nope.csv")), CH, Metrics(),
                     MqttConfig(), "n")


def test_a_topic_level_too_long_for_a_stream_id_names_no_stream():
    # an id names the stream's baseline file: 300 characters could never be saved
    src = build_source(stream("devs", type="mqtt", topic="plant/+/data", stream_from_topic=1),
                       CH, Metrics(), MqttConfig(), "n")
    try:
        assert src.stream_for("plant/" + "p" * 128 + "/data") == "p" * 128
        assert src.stream_for("plant/" + "p" * 129 + "/data") is None
    finally:
        src.close()
