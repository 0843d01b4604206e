"""LineDecoder.decode_streams: a drain's payloads of many streams read in one pass give
each stream exactly the samples, and the decoder exactly the bad-input counts, that
reading each payload on its own gives, malformed payloads mixed in included."""
from __future__ import annotations

import json
import random

import numpy as np
from hypothesis import given, settings, strategies as st

from agent.decoders import LineDecoder
from agent.metrics import Metrics

CH = ["a", "b", "c"]
NOW = 1_700_000_000.0
T0 = 1_699_999_000.0

GOOD_CSV = [b"{t},1,2,3", b"{t};4;5;6", b"{t},7,,9", b"{t},1e3,nan,3\n{t1},4,5,6"]
BAD_CSV = [b"", b"   \n", b"{t},1,2", b"{t},1,x,3", b"\xff\xfe,1,2,3", b"{t},1_0,2,3",
           b"99999999999999,1,2,3", b"{t},1,2,3,4", b"{t},1e39,2,3"]
GOOD_JSON = [b'{"ts": {t}, "values": [1, 2, 3]}', b'{"ts": {t}, "a": 1, "b": 2, "c": 3}',
             b'[{"ts": {t}, "values": [1, 2, 3]}, {"ts": {t1}, "values": [4, null, 6]}]',
             b'{"ts": {t}, "a": 1, "zz": 5}']
BAD_JSON = [b"{", b"[1, 2]", b'{"ts": {t}, "values": [1, 2]}', b'{"ts": {t}, "q": 1}',
            b'{"ts": "yesterday", "values": [1, 2, 3]}', b'{"ts": {t}, "values": ["x", 2, 3]}']


def _mix(protocol: str, streams: int, per: int, seed: int) -> list[tuple[str, bytes, float]]:
    """(stream, payload, arrival) in arrival order; a clock step back now and then."""
    rnd = random.Random(seed)
    good, bad = (GOOD_CSV, BAD_CSV) if protocol == "csv" else (GOOD_JSON, BAD_JSON)
    out = []
    for k in range(per):
        for i in range(streams):
            t = T0 + k - (600 if rnd.random() < 0.05 else 0)
            form = rnd.choice(bad) if rnd.random() < 0.3 else rnd.choice(good)
            out.append((f"s{i}", form.replace(b"{t}", str(t).encode())
                        .replace(b"{t1}", str(t + 0.5).encode()), NOW + k))
    return out


def _groups(msgs) -> dict:
    g: dict = {}
    for sid, payload, now in msgs:
        p, a = g.setdefault(sid, ([], []))
        p.append(payload)
        a.append(now)
    return g


def _one_by_one(protocol: str, msgs) -> tuple[dict, Metrics]:
    m = Metrics()
    d = LineDecoder(CH, protocol, "auto", m, "one")
    got: dict = {}
    for sid, payload, now in msgs:
        r = d.decode_payload(payload, now, sid)
        if r is not None:
            got.setdefault(sid, []).append(r)
    return {sid: (np.concatenate([r[0] for r in rs]), np.concatenate([r[1] for r in rs]))
            for sid, rs in got.items()}, m


def test_one_pass_matches_payload_by_payload():
    for protocol in ("csv", "json"):
        for seed in range(3):
            msgs = _mix(protocol, streams=40, per=6, seed=seed)
            want, m_want = _one_by_one(protocol, msgs)
            m = Metrics()
            d = LineDecoder(CH, protocol, "auto", m, "all")
            got = {}
            # drains of 2 ticks each: the per-stream clocks carry over between calls
            for a in range(0, len(msgs), 80):
                for sid, ts, v in d.decode_streams(_groups(msgs[a:a + 80])):
                    got.setdefault(sid, []).append((ts, v))
            got = {sid: (np.concatenate([p[0] for p in ps]), np.concatenate([p[1] for p in ps]))
                   for sid, ps in got.items()}
            assert sorted(got) == sorted(want)
            for sid, (ts, v) in want.items():
                assert got[sid][0].dtype == ts.dtype and got[sid][1].dtype == v.dtype
                assert got[sid][0].tobytes() == ts.tobytes()
                assert got[sid][1].tobytes() == v.tobytes()
            assert m.malformed == m_want.malformed and sum(m.malformed.values()) > 0
            assert m.malformed["bad_timestamp"] > 0


def test_a_stream_that_raises_is_left_out_and_the_others_keep_their_samples(caplog):
    m = Metrics()
    d = LineDecoder(CH, "csv", "first", m, "mqtt:plant")
    good = f"{T0},1,2,3".encode()
    # a payload that is not bytes makes reading it raise: a bug, not bad input
    got = d.decode_streams({"s0": ([good], [NOW]), "s1": ([good, None], [NOW, NOW]),
                            "s2": ([f"{T0},4,5,6".encode()], [NOW])})
    assert [sid for sid, _, _ in got] == ["s0", "s2"]
    assert got[1][1].tolist() == [T0] and got[1][2].tolist() == [[4, 5, 6]]
    assert "2 message(s) of stream s1 could not be handled" in caplog.text
    assert d.decode_streams({"s1": ([b"", b"x"], [NOW, NOW])}) == []
    assert m.malformed == {"empty": 1, "field_count": 1}


def test_packed_rows_are_the_casts_of_nested_rows():
    from agent.decoders import _pack
    rng = np.random.default_rng(1)
    rows = (rng.standard_normal((300, 3)) * 10.0 ** rng.integers(-40, 38, (300, 3))).tolist()
    rows[4][1], rows[9][0] = float("nan"), -0.0
    ts, v = _pack(list(range(300)), rows)
    assert v.shape == (300, 3) and v.tobytes() == np.array(rows, np.float32).tobytes()


# ---------------------------------------------------------------- the block path
# Numbers that are not what the block takes: the line reader's, as NaN or refused.
_ODD_NUMBERS = ["1e39", "-1e39", "1e999", "1e", ".", "5.", ".5", "+5", "-0", "0e0", "1E5",
                "--1", "1.2.3", "", "nan", " 1", "1_0", "4e-46", "3.4028235e38", "١"]


DEFECTS = ["number", "back", "jitter", "future", "jump", "ahead", "range", "iso", "units",
           "semicolon",
           "newline", "empty", "fewer", "more", "blank"]


def _stamp(t: float, unit: str) -> str:
    return f"{t:.3f}" if unit == "s" else str(int(t * {"ms": 1e3, "us": 1e6, "ns": 1e9}[unit]))


@st.composite
def stream_payloads(draw, k0: int, timestamp: str) -> list[bytes]:
    """One stream's payloads in a drain: clean (what the block takes) or with one defect
    (which sends the stream, or the line, to the line reader)."""
    stamped = {"first": True, "none": False}.get(timestamp, draw(st.booleans()))
    unit = draw(st.sampled_from(["s", "ms", "us", "ns"]))
    step = draw(st.sampled_from([0.01, 1.0]))
    n = draw(st.integers(1, 8))
    defect = draw(st.sampled_from(DEFECTS + [None] * len(DEFECTS)))
    # "ahead": a device whose clock is right while this machine's is two days behind
    lead = 2 * 86400 if defect == "ahead" else 0
    lines = []
    for k in range(k0, k0 + n):
        vals = [draw(st.floats(-100, 100).map(lambda x: f"{x:.5g}")) for _ in CH]
        lines.append(([_stamp(T0 + lead + k * step, unit)] if stamped else []) + vals)
    i = draw(st.integers(0, n - 1))
    row, t = lines[i], T0 + (k0 + i) * step
    if defect == "number":
        row[-1] = draw(st.sampled_from(_ODD_NUMBERS))
    elif defect in ("back", "jitter", "future", "jump", "range", "iso", "units") and stamped:
        row[0] = {"back": _stamp(t - 5 - step * i, unit), "jitter": _stamp(t - 0.5, unit),
                  "future": f"{NOW + 2 * 86400:.0f}", "jump": _stamp(t + 3600, unit),
                  "range": "123",
                  "iso": "2023-11-14T22:13:20Z", "units": _stamp(t, "ms" if unit == "s" else "s")
                  }[defect]
    elif defect in ("fewer", "more"):
        lines[i] = row[:-1] if defect == "fewer" else row + ["1"]
    text = [",".join(r) for r in lines]
    if defect == "semicolon":
        text[i] = text[i].replace(",", ";")
    elif defect == "blank":
        text[i] = ""
    per = draw(st.integers(1, 3))       # lines per payload
    out = [("\n".join(text[a:a + per])) for a in range(0, n, per)]
    if defect == "newline":
        out[-1] += "\n"
    elif defect == "empty":
        out.insert(draw(st.integers(0, len(out))), " ")
    return [p.encode() for p in out]


@st.composite
def drain(draw, timestamp: str, k0: int):
    msgs = []
    for s in range(draw(st.integers(1, 5))):
        for k, payload in enumerate(draw(stream_payloads(k0, timestamp))):
            msgs.append((f"s{s}", payload, NOW + k))
    return msgs


def _clocks(d: LineDecoder) -> dict:
    return {sid: (c.last, c.step, c.lead, c.behind, c.behind_t, c.ahead, c.ahead_t, c.has_ts,
                  [h[:2] for h in c.held or ()])
            for sid, c in d._clocks._clocks.items()}


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["auto", "first", "none"]), st.data())
def test_the_block_reads_what_the_line_reader_reads(timestamp, data):
    """Drains of generated CSV payloads: decode_streams (block where it can, line by line
    where not) gives every stream the samples, the decoder the counts and every stream's
    clock the state that reading each payload on its own gives."""
    m_want, m_got = Metrics(), Metrics()
    one = LineDecoder(CH, "csv", timestamp, m_want, "one")
    both = LineDecoder(CH, "csv", timestamp, m_got, "all")
    for k0 in (0, 10, 20):      # drains one after another: the clocks carry over
        msgs = data.draw(drain(timestamp, k0))
        want: dict = {}
        for sid, payload, now in msgs:
            r = one.decode_payload(payload, now, sid)
            if r is not None:
                want.setdefault(sid, []).append(r)
        got = {sid: (ts, v) for sid, ts, v in both.decode_streams(_groups(msgs))}
        assert sorted(got) == sorted(want)
        for sid, rs in want.items():
            assert got[sid][0].tobytes() == np.concatenate([r[0] for r in rs]).tobytes()
            assert got[sid][1].tobytes() == np.concatenate([r[1] for r in rs]).tobytes()
        assert m_got.malformed == m_want.malformed
        assert _clocks(both) == _clocks(one)


def test_a_well_formed_drain_is_read_as_one_block_and_a_bad_stream_is_left_out():
    from agent.csv_block import read_block
    from agent.device_clock import Clock
    payloads, per = [], []
    for s in range(4):
        rows = [f"{T0 + k:.3f},{s},{k}.5,-{k}e-3" for k in range(5)]
        if s == 2:
            rows[3] = rows[3].replace(",", ",,", 1)      # an empty field: the line reader's
        payloads += [r.encode() for r in rows]
        per.append(5)
    # `auto` streams that have not decided are the line reader's (csv_auto.py holds lines)
    undecided = [Clock() for _ in per]
    assert read_block(payloads, [NOW] * len(payloads), per, undecided, len(CH), "auto",
                      1 << 16, 0.0) is None
    assert all(c.last is None and c.has_ts is None for c in undecided)
    clocks = [Clock(True) for _ in per]
    block = read_block(payloads, [NOW] * len(payloads), per, clocks, len(CH), "auto", 1 << 16,
                       0.0)
    assert [block.take(i) is None for i in range(4)] == [False, False, True, False]
    ts, v = block.take(3)
    assert ts.tolist() == [T0 + k for k in range(5)]
    assert v.tolist() == [[3.0, k + 0.5, np.float32(-k / 1000)] for k in range(5)]
    assert clocks[3].last == T0 + 4 and clocks[3].has_ts is True
    assert clocks[2].last is None       # untouched: the line reader reads that stream


def test_a_bulk_payload_is_read_line_by_line_at_the_line_readers_memory():
    """A block's temporaries take ~10x its bytes (a bytes object per field); a payload
    over BLOCK_BYTES (a bulk upload, up to 4 MiB) is read line by line instead, with the
    same samples, at ~6x (what README's memory bounds assume)."""
    import tracemalloc
    from agent.decoders import BLOCK_BYTES
    rng = np.random.default_rng(0)
    rows = [f"{T0 + k * 0.001:.3f},{a:.6g},{b:.6g},{c:.6g}"
            for k, (a, b, c) in enumerate(rng.normal(0, 10, (70_000, 3)).tolist())]
    payload = "\n".join(rows).encode()
    assert len(payload) > BLOCK_BYTES
    want = LineDecoder(CH, "csv", "auto", Metrics(), "one").decode_payload(payload, NOW, "s")
    d = LineDecoder(CH, "csv", "auto", Metrics(), "all")
    tracemalloc.start()
    try:
        [(sid, ts, v)] = d.decode_streams({"s": ([payload], [NOW])})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert ts.tobytes() == want[0].tobytes() and v.tobytes() == want[1].tobytes()
    assert peak < 8 * len(payload)


def test_a_failing_block_reader_costs_no_sample(monkeypatch, caplog):
    # a bug in the block path: every stream is read line by line, and it is logged once
    import agent.decoders as dec

    def broken(*a, **k):
        raise IndexError("a bug")
    monkeypatch.setattr(dec, "read_block", broken)
    d = LineDecoder(CH, "csv", "first", Metrics(), "mqtt:plant")
    for k in range(2):
        got = d.decode_streams({"s0": ([f"{T0 + k},1,2,3".encode()], [NOW]),
                                "s1": ([f"{T0 + k},4,5,6".encode()], [NOW])})
        assert [(sid, v.tolist()) for sid, _, v in got] == [("s0", [[1, 2, 3]]),
                                                           ("s1", [[4, 5, 6]])]
    assert caplog.text.count("the CSV block reader failed") == 1
