"""What went wrong in a run that failed, in a few lines, so `launch status` and `launch --follow` can say it without
the user opening the logs.

Where it is found, best first: the ERROR records of the ranks' logs from the run's last attempt (what the job logs
when it refuses its input, diverges, cannot write, or crashes: launcher/train/job.py logs a crash's exception and
where it happened on every rank); for a tokenize job that failed, its logs/prepare*.log; the reason rank 0 recorded
(launcher/common/outcome.py); and, when no rank got to write anything (a node lost, the OOM killer, a bad
environment), the error lines of the scheduler's own output for the job.

Planning side: standard library only.
"""

from __future__ import annotations

import re
from pathlib import Path

from launcher.common import outcome
from launcher.common.logs import error_records

MAX_LINES = 8
"""At most this many lines in all: the first lines of each error, the latest errors kept."""
LINES_PER_ERROR = 4
"""A multi-line error (a recipe problem list) shows its first lines; a traceback's frames are left to the log."""
_SCHEDULER_ERROR = re.compile(r"error|killed|oom|exception|traceback", re.IGNORECASE)


def _rank_number(path: Path) -> int:
    digits = path.stem.removeprefix("rank")
    return int(digits) if digits.isdigit() else 1 << 30


def _shortened(record: str) -> list[str]:
    """A record's first lines, up to its traceback (the log holds the frames; the first line says where)."""
    lines = record.splitlines()
    if "Traceback (most recent call last):" in lines:
        lines = lines[:lines.index("Traceback (most recent call last):")]
    return [line for line in lines if line.strip()][:LINES_PER_ERROR]


def _last_attempt_start(run_dir: Path) -> float | None:
    recorded = outcome.read(run_dir)
    attempts = recorded.get("attempts") if recorded else None
    return attempts[-1]["start"] if attempts else None


def log_errors(logs: list[Path], since: float | None, label: bool) -> list[list[str]]:
    """The errors in these logs since a time, each once (ranks often fail the same way) and as its first lines,
    labelled `rankN:` when `label` and the log is not rank 0's."""
    seen: set[str] = set()
    errors: list[list[str]] = []
    for path in logs:
        for record in error_records(path, since):
            shown = _shortened(record)
            if not shown or shown[0] in seen:
                continue
            seen.add(shown[0])
            prefix = f"{path.stem}: " if label and path.stem != "rank0" else ""
            errors.append([prefix + shown[0], *shown[1:]])
    return errors


def _latest(errors: list[list[str]]) -> list[str]:
    """The latest whole errors that fit in MAX_LINES (the last one cut short if alone it does not)."""
    kept: list[str] = []
    for error in reversed(errors):
        if kept and len(kept) + len(error) > MAX_LINES:
            break
        kept = error + kept
    return kept[:MAX_LINES]


def scheduler_errors(run_dir: Path, job_id: str, limit: int = 3) -> list[str]:
    """The last error-looking lines of the scheduler's output for a job (submitit's task logs, sbatch's output)."""
    found: list[str] = []
    for path in [*sorted(run_dir.glob(f"submitit/*/{job_id}_*_log.err")), run_dir / f"slurm-{job_id}.out"]:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        found += [line.strip() for line in text.splitlines()[-200:] if _SCHEDULER_ERROR.search(line)]
    return found[-limit:]


def run_errors(run_dir: Path, job_id: str | None = None, prepare_failed: bool = False) -> list[str]:
    """A failed run's error, in at most MAX_LINES lines (empty when nothing says more than the state does)."""
    logs_dir = run_dir / "logs"
    if prepare_failed:
        found = _latest(log_errors(sorted(logs_dir.glob("prepare*.log")), None, label=False))
        return ["the tokenize job failed" + (":" if found else ": see logs/prepare*.log"), *found][:MAX_LINES]
    ranks = sorted(logs_dir.glob("rank*.log"), key=_rank_number)
    lines = _latest(log_errors(ranks, _last_attempt_start(run_dir), label=len(ranks) > 1))
    if not lines:
        recorded = outcome.read(run_dir)
        if recorded is not None and recorded["outcome"] != outcome.Outcome.RUNNING.value and recorded.get("reason"):
            lines = [str(recorded["reason"])]
    if not lines and job_id is not None:
        lines = scheduler_errors(run_dir, job_id)
    return lines
