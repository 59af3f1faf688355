"""What the submitting side and the Slurm task share: the run's job-event log (RUN_DIR/jobs.jsonl), the signal
timing and the exit code that means "requeue me". A leaf module, so cluster/slurm.py and cluster/slurm_task.py do not
import each other.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from launcher.common.exits import EXIT_INTERRUPTED  # noqa: F401 (re-exported: the task requeues on it)

JOBS_FILE = "jobs.jsonl"
"""RUN_DIR/jobs.jsonl: one JSON object per submission, start, requeue and end."""

SIGNAL_DELAY_S = 90
"""Seconds between the pre-time-limit signal and the kill: time to finish a step and write a checkpoint."""


def record_event(run_dir: Path, event: str, **fields: Any) -> None:
    """Append one line to RUN_DIR/jobs.jsonl (submissions, starts, requeues). One write per line, so concurrent
    appends from several processes do not interleave (O_APPEND, lines well under PIPE_BUF)."""
    line = json.dumps({"event": event, "time": round(time.time(), 3), **fields}) + "\n"
    fd = os.open(run_dir / JOBS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
