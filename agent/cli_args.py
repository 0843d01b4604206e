"""The command line's parser, its argument types and the flags commands share (agent/cli.py
builds the commands on them)."""
from __future__ import annotations

import argparse


class Parser(argparse.ArgumentParser):
    """argparse's usage errors in one line too (the usage itself is one --help away)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def gap_factor(text: str) -> float:      # --max-gap
    if not ((k := float(text)) == 0 or 1 <= k < float("inf")):
        raise argparse.ArgumentTypeError(f"{text}: 0 (no check) or a factor >= 1 on the median step")
    return k


def running_flags(s) -> None:
    s.add_argument("--running", metavar="CH>LEVEL", help="judge only while this holds, e.g. "
                   "'Current>0.2' (a config's running:)")
    s.add_argument("--running-start-s", type=float, metavar="S", help="running.start_s")
