"""LineDecoder.decode_streams: a drain's payloads of many streams read in one pass give
each stream exactly the samples, and the decoder exactly the bad-input counts, that
reading each payload on its own gives, malformed payloads mixed in included."""
from __future__ import annotations

import json
import random

import numpy as np

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
    d = LineDecoder(CH, "csv", "auto", m, "mqtt:plant")
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
