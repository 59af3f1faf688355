"""How a run ended, recorded by its rank 0 in RUN_DIR/outcome.json, so that `launch status` and `launch runs` tell a
completed run from one stopped by a signal, one that diverged, one that failed at start on bad input and one that
crashed; and `launch --resume` never re-runs a completed one.

The file says `running` (with host and pid) while the job runs and is replaced atomically when it ends. A job killed
outright (SIGKILL, the OOM killer, a node lost) cannot write it: a `running` whose process is gone reads as crashed.
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
from launcher.common.rundir import write_json_atomic

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
    """`best`: the best checkpoint's record (checkpoint.keep_best: metric, value, step, checkpoint), kept as `best`."""
    data: dict[str, Any] = {"outcome": outcome.value, "exit_code": exit_code, "reason": reason,
                            "host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
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
