"""A run's attempts in outcome.json (launcher/common/outcome.py): the time a run ran leaves out the gaps between its
attempts, and an attempt killed outright ends at its last write. (Real runs: tests/cluster/test_run_status.py.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from launcher.common import outcome


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


def test_attempts_sum_their_spans_and_a_killed_one_ends_at_its_last_write(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock(1000.0)
    monkeypatch.setattr(outcome, "time", clock)
    outcome.record(tmp_path, outcome.Outcome.RUNNING)  # attempt 1 at 1000, killed: its last write at 1040
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "rank0.log").write_text("step 1\n")
    os.utime(tmp_path / "logs" / "rank0.log", (1040.0, 1040.0))
    assert outcome.ran_seconds(tmp_path, running=False) == 40.0  # crashed, not resumed yet
    assert outcome.ran_seconds(tmp_path, running=True, now=1100.0) == 100.0  # the scheduler says it still runs

    clock.now = 5000.0  # resumed hours later
    outcome.record(tmp_path, outcome.Outcome.RUNNING)
    clock.now = 5030.0
    outcome.record(tmp_path, outcome.Outcome.STOPPED, exit_code=3)
    clock.now = 9000.0
    outcome.record(tmp_path, outcome.Outcome.RUNNING)
    assert outcome.ran_seconds(tmp_path, now=9005.0) == 40.0 + 30.0 + 5.0  # running: this process is alive
    clock.now = 9010.0
    outcome.record(tmp_path, outcome.Outcome.COMPLETED, exit_code=0)
    recorded = outcome.read(tmp_path)
    assert recorded is not None and recorded["attempts"] == [
        {"start": 1000.0, "end": 1040.0}, {"start": 5000.0, "end": 5030.0}, {"start": 9000.0, "end": 9010.0}]
    assert outcome.ran_seconds(tmp_path, now=99999.0) == 80.0


def test_a_run_recorded_before_attempts_has_no_ran_time(tmp_path: Path) -> None:
    (tmp_path / outcome.OUTCOME_FILE).write_text('{"outcome": "completed", "exit_code": 0}')
    assert outcome.ran_seconds(tmp_path) is None  # `launch status` estimates it from the files instead
    outcome.record(tmp_path, outcome.Outcome.RUNNING)
    assert len(outcome.read(tmp_path)["attempts"]) == 1  # type: ignore[index]
