"""benchmarks/daemon_chain.py: back-to-back recordings joined in time order, as one stream."""
from pathlib import Path

import pandas as pd
import pytest

import benchmark_module


def _piece(path: Path, start: str, n: int, value: float) -> None:
    pd.DataFrame({"datetime": pd.date_range(start, periods=n, freq="s").strftime("%Y-%m-%d %H:%M:%S"),
                  "a": value, "anomaly": 0}).to_csv(path, sep=";", index=False)


def test_pieces_are_joined_in_time_order_not_name_order(tmp_path):
    dc = benchmark_module.load("daemon_chain")
    d = tmp_path / "rec"
    d.mkdir()
    _piece(d / "0.csv", "2024-01-01 00:10:00", 3, 2.0)     # the later piece sorts first by name
    _piece(d / "1.csv", "2024-01-01 00:00:00", 3, 1.0)
    out = pd.read_csv(dc.chain(d, tmp_path / "joined.csv"), sep=";")
    assert out["a"].tolist() == [1.0, 1.0, 1.0, 2.0, 2.0, 2.0]
    assert pd.to_datetime(out["datetime"]).is_monotonic_increasing


def test_overlapping_pieces_are_refused(tmp_path):
    dc = benchmark_module.load("daemon_chain")
    d = tmp_path / "rec"
    d.mkdir()
    _piece(d / "0.csv", "2024-01-01 00:00:00", 10, 1.0)
    _piece(d / "1.csv", "2024-01-01 00:00:05", 10, 2.0)
    with pytest.raises(ValueError, match="overlap"):
        dc.chain(d, tmp_path / "joined.csv")
