"""How a run ended, recorded by its rank 0 in RUN_DIR/outcome.json, so that `launch status` and `launch runs` tell a
completed run from one stopped by a signal, one that diverged, one that failed at start on bad input and one that
crashed; and `launch --resume` never re-runs a completed one.

The file says `running` (with host and pid) while the job runs and is replaced atomically when it ends. A job killed
outright (SIGKILL, the OOM killer, a node lost) cannot write it: a `running` whose process is gone reads as crashed.

It also keeps the run's `attempts` (first start, each resume or requeue): when each began and ended, so the time a run
actually ran (`ran_seconds`) leaves out the queue and the days between a stop and its resume. An attempt killed
outright has no end; its last write to the run directory stands for it.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from launcher.common.exits import EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_OK, EXIT_WRITE_FAILED
from launcher.common.rundir import METRICS_FILE, write_json_atomic

OUTCOME_FILE = "outcome.json"
log = logging.getLogger("ftlaunch")


class Outcome(str, enum.Enum):
    RUNNING = "running"
    COMPLETED = "completed"
    STOPPED = "stopped"
    """By a signal (Ctrl-C, preemption, time limit) after writing a checkpoint: resumable."""
    DIVERGED = "diverged"
    """Non-finite losses in a row (`optim.max_nonfinite_steps`); the last good checkpoint is intact."""
    FAILED = "failed"
    """Bad input found when the job started (data, tokenizer), or the run directory could not be written (disk
    full): the message is in the rank's log and the reason."""
    CRASHED = "crashed"
    """An exception, or the process died without a word."""


_BY_EXIT = {EXIT_OK: Outcome.COMPLETED, EXIT_INTERRUPTED: Outcome.STOPPED, EXIT_DIVERGED: Outcome.DIVERGED,
            EXIT_BAD_INPUT: Outcome.FAILED, EXIT_WRITE_FAILED: Outcome.FAILED}


def outcome_of_exit(code: int) -> Outcome:
    return _BY_EXIT.get(code, Outcome.CRASHED)


def record(run_dir: Path, outcome: Outcome, exit_code: int | None = None, reason: str | None = None,
           best: dict[str, Any] | None = None) -> None:
    """`best`: the best checkpoint's record (checkpoint.keep_best: metric, value, step, checkpoint), kept as `best`.
    RUNNING starts an attempt, anything else ends the current one."""
    now = time.time()
    data: dict[str, Any] = {"outcome": outcome.value, "exit_code": exit_code, "reason": reason,
                            "host": socket.gethostname(), "pid": os.getpid(), "time": now,
                            "attempts": _attempts(run_dir, starting=outcome is Outcome.RUNNING, now=now)}
    if best is not None:
        data["best"] = best
    try:
        write_json_atomic(run_dir / OUTCOME_FILE, data)
    except OSError as err:  # a full disk must not turn a clean exit into a traceback; the log still says why
        log.warning("%s not written (%s)", run_dir / OUTCOME_FILE, err)


def read(run_dir: Path) -> dict[str, Any] | None:
    """The recorded outcome; a `running` whose process is gone on this host comes back as crashed."""
    try:
        data = json.loads((run_dir / OUTCOME_FILE).read_text())
        outcome = Outcome(data["outcome"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if outcome is Outcome.RUNNING and data.get("host") == socket.gethostname() and not _alive(data.get("pid")):
        data.update(outcome=Outcome.CRASHED.value, reason="the job's process is gone without recording an end "
                    "(killed: SIGKILL, out of memory?)")
    return data


def _attempts(run_dir: Path, *, starting: bool, now: float) -> list[dict[str, float]]:
    """The recorded attempts with this record's change: a new one started, or the open one ended now."""
    try:
        attempts = [a for a in json.loads((run_dir / OUTCOME_FILE).read_text()).get("attempts", [])
                    if isinstance(a, dict) and isinstance(a.get("start"), (int, float))]
    except (OSError, ValueError, AttributeError):
        attempts = []
    if attempts and "end" not in attempts[-1]:  # starting: the previous attempt was killed without a word
        attempts[-1]["end"] = now if not starting else last_activity(run_dir, attempts[-1]["start"])
    if starting:
        attempts.append({"start": now})
    return attempts


def last_activity(run_dir: Path, since: float) -> float:
    """When rank 0 last wrote its log or metrics (not before `since`): the end of an attempt killed outright. Read
    before the next attempt writes either (job.py records RUNNING before it logs anything)."""
    stamps = [since]
    for path in (run_dir / "logs" / "rank0.log", run_dir / METRICS_FILE):
        try:
            stamps.append(path.stat().st_mtime)
        except OSError:
            pass
    return max(stamps)


def ran_seconds(run_dir: Path, running: bool | None = None, now: float | None = None) -> float | None:
    """How long the run's attempts ran, together: queue time and the gaps between attempts left out. None for a run
    recorded before attempts were (the caller estimates). `running`: whether the open attempt still runs (the
    scheduler knows best); by default what the record says (a process gone on this host reads as crashed)."""
    data = read(run_dir)
    attempts = data.get("attempts") if data is not None else None
    if not attempts:
        return None
    if running is None:
        running = data is not None and data["outcome"] == Outcome.RUNNING.value
    now = time.time() if now is None else now
    total = 0.0
    for attempt in attempts:
        start = attempt["start"]
        end = attempt.get("end")
        if end is None:
            end = now if running else last_activity(run_dir, start)
        total += max(0.0, end - start)
    return total


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def completed(run_dir: Path) -> bool:
    """The run finished: recorded so, or (runs from before outcome.json) its outputs were written."""
    data = read(run_dir)
    if data is not None:
        return data["outcome"] == Outcome.COMPLETED.value
    return any((run_dir / name).is_dir() for name in ("adapter", "model", "merged"))
