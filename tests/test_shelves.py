"""The shelve book on disk (agent/shelves.py): what a broken or full state_dir does to it.
Shelves surviving a restart and a reload of the real agent: tests/test_mqtt_ops.py."""
from __future__ import annotations

import json
import logging
import os
import time

import pytest

from agent.shelves import FILE, ShelfBook


def test_a_book_keeps_what_is_in_force_and_drops_what_ended(tmp_path):
    book = ShelfBook(tmp_path)
    book.record("a", 3600)
    book.record("b", 3600)
    book.record("b", 0)                       # unshelved
    doc = json.loads((tmp_path / FILE).read_text())
    assert set(doc["ends"]) == {"a"} and doc["ends"]["a"] > time.time() + 3500
    doc["ends"]["old"] = time.time() - 1      # ended while the agent was away
    (tmp_path / FILE).write_text(json.dumps(doc))
    assert set(ShelfBook(tmp_path).ends) == {"a"}


@pytest.mark.parametrize("content", ["{not json", '{"ends": [1, 2]}', '"x"', '{"ends": {"a": "soon"}}'])
def test_a_damaged_file_is_logged_and_restores_nothing(tmp_path, caplog, content):
    (tmp_path / FILE).write_text(content)
    with caplog.at_level(logging.WARNING):
        book = ShelfBook(tmp_path)
    assert book.ends == {} and "cannot be read" in caplog.text
    book.record("a", 60)                      # and the book works on
    assert set(json.loads((tmp_path / FILE).read_text())["ends"]) == {"a"}


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_a_state_dir_that_cannot_be_written_keeps_the_book_in_memory(tmp_path, caplog):
    tmp_path.chmod(0o500)
    try:
        book = ShelfBook(tmp_path)
        with caplog.at_level(logging.WARNING):
            book.record("a", 60)
        assert "cannot be written" in caplog.text and set(book.ends) == {"a"}
    finally:
        tmp_path.chmod(0o700)


def test_a_path_that_is_no_folder_keeps_the_book_in_memory(tmp_path, caplog):
    (tmp_path / "file").write_text("")
    book = ShelfBook(tmp_path / "file")
    with caplog.at_level(logging.WARNING):
        book.record("a", 60)
    assert "cannot be written" in caplog.text and set(book.ends) == {"a"}


# ---------------------------------------------------------------- with a real engine
def _engine(tmp_path, **kw):
    from agent.config import DetectionConfig
    from agent.config_build import build
    from agent.detector import Detector
    from agent.engine import Engine
    from onnx_factory import make_model
    path, _ = make_model(tmp_path / "m.onnx", window=8, channels=["a", "b", "c"])
    return Engine(build(DetectionConfig, {"node": "t", "calibration": {"enabled": False},
                                          "scoring": {"threshold": 1.0}}),
                  Detector(str(path)), **kw)


def test_a_restored_shelve_lasts_at_most_the_week_a_command_may_ask_for(tmp_path):
    """A wall clock behind at start (no RTC, before NTP) must not stretch a shelve."""
    import numpy as np
    from agent.commands import MAX_SHELVE_S
    (tmp_path / FILE).write_text(json.dumps({"ends": {"pump": time.time() + 3 * MAX_SHELVE_S}}))
    e = _engine(tmp_path, named=["pump"])
    ShelfBook(tmp_path).restore(e)
    left = e.streams["pump"].tracker.shelved_until - time.time()
    assert 0.99 * MAX_SHELVE_S < left <= MAX_SHELVE_S
    assert np.isfinite(left)


def test_a_waiting_shelve_does_not_count_a_refused_stream_twice(tmp_path):
    import numpy as np
    from agent.sources.base import Batch
    e = _engine(tmp_path, default_max_streams=1)
    one = np.zeros((1, 3), np.float32)
    e.step([Batch("a", np.array([1.7e9]), one, source="src")])
    book = ShelfBook(tmp_path)
    book.record("b", 60)
    book.waiting = {"b"}
    batch = [Batch("b", np.array([1.7e9 + 1]), one, source="src")]
    book.catch_up(e, batch)                    # src is at its cap: the step refuses b
    e.step(batch)
    assert e.metrics.dropped["stream_limit"] == 1 and "b" in book.waiting


def test_a_shelve_read_back_lasts_no_longer_than_it_was_asked_for(tmp_path):
    """A Raspberry Pi without a real-time clock boots 12 h behind (fake-hwclock): its one-hour
    shelve's end, by that clock, is 13 h away.  The audit saw 46,770 s given back."""
    (tmp_path / FILE).write_text(json.dumps({"ends": {"pump": time.time() + 13 * 3600},
                                             "asked": {"pump": 3600}}))
    e = _engine(tmp_path, named=["pump"])
    ShelfBook(tmp_path).restore(e)
    left = e.streams["pump"].tracker.shelved_until - time.time()
    assert 3590 < left <= 3600


def test_a_wall_clock_step_neither_lifts_nor_stretches_a_shelve(tmp_path, monkeypatch):
    """NTP steps the clock of a Pi that booted without one: the shelve keeps its hour,
    in the book, in the file, and when it is given to the stream again."""
    book = ShelfBook(tmp_path)
    book.record("pump", 3600)
    real = time.time
    for step in (3 * 3600, -12 * 3600):
        monkeypatch.setattr(time, "time", lambda: real() + step)
        assert 3590 < book.ends["pump"] - time.time() <= 3600
        book.record("other", 60)            # a write with the stepped clock
        on_disk = json.loads((tmp_path / FILE).read_text())
        assert 3590 < on_disk["ends"]["pump"] - time.time() <= 3600
        e = _engine(tmp_path, named=["pump"])
        book.restore(e)
        assert 3590 < e.streams["pump"].tracker.shelved_until - time.time() <= 3600
