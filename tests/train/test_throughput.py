"""Tokens/s over a window and over the run, and the ETA, from recorded steps (launcher/train/throughput.py)."""

from __future__ import annotations

import pytest

from launcher.train.throughput import Throughput, clock


def test_window_run_average_and_eta() -> None:
    speed = Throughput(total_steps=10, window=3)
    assert speed.eta_seconds(0) is None and speed.summary(0).endswith("eta -")
    # Step i: 100 tokens in 1 s, ending at t = 2i (a second of evaluation or checkpoint after each step).
    for i in range(1, 5):
        speed.record(100.0, 1.0 if i < 4 else 4.0, now=2.0 * i)
    # The window holds steps 2, 3, 4: 300 tokens in 6 s; the run: 400 tokens in 7 s.
    assert speed.window_tokens_per_s == pytest.approx(50.0)
    assert speed.run_tokens_per_s == pytest.approx(400 / 7)
    # 2 s of wall time between step ends in the window, 6 steps left.
    assert speed.eta_seconds(4) == pytest.approx(12.0)
    assert speed.summary(4) == "50 tok/s (run 57)  eta 0:12"


def test_clock() -> None:
    assert [clock(None), clock(5), clock(65.4), clock(3725)] == ["-", "0:05", "1:05", "1:02:05"]
