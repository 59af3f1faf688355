"""Following a run: `launch RECIPE --nodes N --follow` (and `launch --resume RUN --follow`) after submitting, and
`launch logs RUN --follow` on any run, local or Slurm.

Rank 0's log (where `launch logs` reads it: cluster/runs.py log_path) is printed as it grows; the run's state is what
`launch status` reads (cluster/runs.py run_status: sacct, else squeue, for Slurm; outcome.json for a run on this
machine), polled every STATE_POLL_S, and each change is said (PENDING -> RUNNING, a requeue after preemption: the
same run, followed on). When the job ends the command exits with its code (FollowExit). Ctrl-C stops following only.
A job that neither sacct nor squeue knows for LOST_AFTER_S (accounting off, or gone from the controller), or a run
that never starts, ends the follow with a message instead of waiting forever.

`Follower` is the state machine (one observation in, what to say and whether it ended out), apart from the loop
that reads files and sleeps, so it is tested on observations made up in the test.

Planning side: standard library only.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from cluster.runs import LOCAL_ENDED, TERMINAL, RunStatus, log_path, run_status, slurm_exit_code
from launcher.common.exits import EXIT_CTRL_C, EXIT_JOB_CANCELLED, EXIT_JOB_LOST, EXIT_JOB_TIMEOUT, EXIT_OK
from launcher.common.rundir import PLAN_FILE

LOG_POLL_S = 1.0
"""How often the log is read (a stat and, when it grew, a read)."""
STATE_POLL_S = 5.0
"""How often the state is asked (a sacct or squeue call): often enough to notice the end, gentle on slurmctld."""
LOST_AFTER_S = 180.0
"""A job unknown to sacct and squeue (or a run not started) this long ends the follow: Slurm has forgotten it, or
nothing will start it."""
SETTLE_S = {"PREEMPTED": 60.0, "NODE_FAIL": 60.0}
"""Ends Slurm may requeue the job from (it was submitted with --requeue): waited on before taking them as final."""
REQUEUE_STATES = {"REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "PENDING", "PREEMPTED", "NODE_FAIL"}
"""States a running job goes to when it is requeued."""
CHUNK_BYTES = 1 << 20


# ------------------------------------------------------------------------------------------------------ the log
class LogTail:
    """A rank's log, read from where the last read stopped. The file it is may change while the run starts (the
    scheduler's output until the rank writes RUN_DIR/logs/rankR.log): a new file is read from its start, a file
    that shrank (rewritten) from its start too. Only whole lines are written out until `drain`."""

    def __init__(self, run_dir: Path, rank: int = 0, from_end: bool = False, last_lines: int | None = None) -> None:
        self.run_dir, self.rank = run_dir, rank
        self.path: Path | None = log_path(run_dir, rank)
        self.offset = 0
        self.partial = b""
        if self.path is not None and from_end:
            self.offset = self.path.stat().st_size
        elif self.path is not None and last_lines is not None:
            data = self.path.read_bytes()
            shown = data.splitlines(keepends=True)[-last_lines:] if last_lines > 0 else []
            self.offset = len(data) - sum(len(line) for line in shown)

    def pump(self, out: IO[str], final: bool = False) -> bool:
        """Write what was added since the last call (whole lines; all of it when final); True if anything was."""
        path = log_path(self.run_dir, self.rank)
        if path is None:
            return False
        if path != self.path:
            self.path, self.offset, self.partial = path, 0, b""
        try:
            size = path.stat().st_size
            if size < self.offset:
                self.offset, self.partial = 0, b""
            with path.open("rb") as handle:
                handle.seek(self.offset)
                data = handle.read(CHUNK_BYTES)
                while len(data) == CHUNK_BYTES and final:
                    more = handle.read(CHUNK_BYTES)
                    data += more
                    if not more:
                        break
        except OSError:
            return False
        self.offset += len(data)
        data = self.partial + data
        whole = len(data) if final else data.rfind(b"\n") + 1
        self.partial = data[whole:]
        if whole:
            out.write(data[:whole].decode(errors="replace"))
            out.flush()
        return bool(whole)

    def drain(self, out: IO[str]) -> None:
        """All that is left, an unfinished last line included."""
        while self.pump(out, final=True):
            pass


def show_log(run_dir: Path, rank: int, lines: int | None = None, out: IO[str] = sys.stdout) -> int:
    """`launch logs RUN` without --follow: print a rank's log (its last `lines` lines) once."""
    check_rank(run_dir, rank)
    tail = LogTail(run_dir, rank, last_lines=lines)
    if tail.path is None:
        raise FileNotFoundError(f"no log for rank {rank} in {run_dir} yet")
    tail.drain(out)
    return 0


def check_rank(run_dir: Path, rank: int) -> None:
    world = json.loads((run_dir / PLAN_FILE).read_text()).get("world_size", 1)
    if not 0 <= rank < world:
        raise FileNotFoundError(f"--rank {rank}: the run has ranks 0..{world - 1}")


# ---------------------------------------------------------------------------------------------- the exit code
def exit_code(status: RunStatus, job_exit: int | None) -> int:
    """The code `launch --follow` exits with once the run has ended (launcher/common/exits.py): 0 completed; a failed
    run's own code (rank 0's, from outcome.json: 2 bad input, 3 stopped after a checkpoint, 4 diverged, 5 disk full;
    else the Slurm job's exit code, else 1); EXIT_JOB_CANCELLED for a cancelled (or preempted, not requeued) job,
    EXIT_JOB_TIMEOUT for one that reached its time limit."""
    if status.state == "COMPLETED":
        return EXIT_OK
    if status.kind == "slurm" and not status.prepare_failed:
        if status.state in ("CANCELLED", "PREEMPTED"):
            return EXIT_JOB_CANCELLED
        if status.state in ("TIMEOUT", "DEADLINE"):
            return EXIT_JOB_TIMEOUT
    for code in (status.exit_code, job_exit):
        if code:  # a failed job whose rank 0 recorded 0 still failed: the job's own code, else 1
            return code
    return 1


# --------------------------------------------------------------------------------------------- state machine
@dataclass
class Follower:
    """What following a run says and when it stops, one observation (a RunStatus) at a time."""

    run_dir: Path
    lost_after_s: float = LOST_AFTER_S
    last: RunStatus | None = None
    waiting_since: float | None = None
    """Since when the job has been unknown (or the run not started)."""
    ended_since: float | None = None
    """Since when the run has been seen ended (a state Slurm may requeue from counts after SETTLE_S)."""

    def _name(self, status: RunStatus) -> str:
        return f"Slurm job {status.job_id}" if status.job_id else f"run {status.run}"

    def observe(self, status: RunStatus, now: float) -> tuple[list[str], bool]:
        """Lines to say about this observation, and whether the run has ended (or is given up on)."""
        lines: list[str] = []
        last = self.last
        self.last = status
        name = self._name(status)
        if last is None and self.ended(status):
            pass  # ended before following began: `ending` says how
        elif last is None or (last.job_id != status.job_id and status.job_id):
            if last is not None and last.job_id:
                lines.append(f"{name}: the run was submitted again (was Slurm job {last.job_id}); following it")
            lines.append(f"{name}: {status.state}" + self._where(status))
        elif last.state != status.state:
            lines.append(f"{name}: {last.state} -> {status.state}" + self._where(status) + self._requeue(last, status))
        if status.prepare and (last is None or last.prepare != status.prepare):
            prepare_id, prepare_state = status.prepare.split()
            lines.append(f"tokenize job {prepare_id}: {prepare_state}"
                         + (" (training starts after it)" if prepare_state not in TERMINAL else ""))
        if status.state in ("UNKNOWN", "PLANNED"):
            self.waiting_since = now if self.waiting_since is None else self.waiting_since
            if now - self.waiting_since >= self.lost_after_s:
                lines.append(self._lost(status))
                return lines, True
            return lines, False
        self.waiting_since = None
        if not self.ended(status):
            self.ended_since = None
            return lines, False
        settle = SETTLE_S.get(status.state, 0.0) if status.kind == "slurm" else 0.0
        self.ended_since = now if self.ended_since is None else self.ended_since
        return lines, now - self.ended_since >= settle

    @staticmethod
    def ended(status: RunStatus) -> bool:
        return status.state in TERMINAL if status.kind == "slurm" else status.state in LOCAL_ENDED

    @staticmethod
    def _where(status: RunStatus) -> str:
        return f" on {status.node_list}" if status.state == "RUNNING" and status.node_list else ""

    @staticmethod
    def _requeue(last: RunStatus, status: RunStatus) -> str:
        if last.state in ("RUNNING", "COMPLETING") and status.state in REQUEUE_STATES:
            return " (requeued: preemption or the time limit; the same run resumes from its last checkpoint)"
        return ""

    def _lost(self, status: RunStatus) -> str:
        waited = f"{self.lost_after_s:.0f} s"
        if status.state == "PLANNED":
            return (f"run {status.run} has not started in {waited}: stopped following (start it: launch --resume "
                    f"{self.run_dir})")
        return (f"{self._name(status)}: neither sacct nor squeue has known it for {waited} (accounting off, or the "
                f"controller has forgotten the job): stopped following. The run directory says what it did: "
                f"launch status {self.run_dir}")

    def ending(self, status: RunStatus, code: int) -> list[str]:
        """The last lines: how the run ended, its error, the exit code."""
        if status.state in ("UNKNOWN", "PLANNED"):
            return []
        why = ": its tokenize job failed" if status.prepare_failed and status.state != "FAILED" else ""
        lines = [f"{self._name(status)} ended: {status.state}{why} (exit code {code})"]
        if status.error:
            lines += ["error: " + status.error[0], *("  " + line for line in status.error[1:])]
        if status.state not in ("COMPLETED",):
            lines.append(f"state: launch status {self.run_dir}    resume: launch --resume {self.run_dir}")
        return lines


# ------------------------------------------------------------------------------------------------------- loop
def follow(run_dir: Path, *, rank: int = 0, from_end: bool = False, last_lines: int | None = None,
           say: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
           out: IO[str] = sys.stdout, watch: Callable[[Path], RunStatus] = run_status,
           job_exit: Callable[[str], int | None] = slurm_exit_code, sleep: Callable[[float], None] = time.sleep,
           clock: Callable[[], float] = time.monotonic, lost_after_s: float = LOST_AFTER_S) -> int:
    """Print rank `rank`'s log as it grows and the run's state changes until the run ends; return the exit code
    (exit_code; EXIT_JOB_LOST when given up on; EXIT_CTRL_C when Ctrl-C stopped following, the job untouched).
    `from_end`: skip what the log holds already (a resumed run's earlier attempts)."""
    check_rank(run_dir, rank)
    tail = LogTail(run_dir, rank, from_end=from_end, last_lines=last_lines)
    follower = Follower(run_dir, lost_after_s=lost_after_s)
    next_state = clock()
    try:
        while True:
            tail.pump(out)
            if clock() >= next_state:
                status = watch(run_dir)
                lines, done = follower.observe(status, clock())
                for line in lines:
                    say(line)
                if done:
                    tail.drain(out)
                    if status.state in ("UNKNOWN", "PLANNED"):
                        return EXIT_JOB_LOST
                    code = exit_code(status, job_exit(status.job_id) if status.job_id else None)
                    for line in follower.ending(status, code):
                        say(line)
                    return code
                next_state = clock() + STATE_POLL_S
            sleep(LOG_POLL_S)
    except KeyboardInterrupt:
        last = follower.last
        if last is not None and last.job_id:
            say(f"stopped following; Slurm job {last.job_id} keeps running. Follow again: launch logs {run_dir} "
                f"--follow    stop it: launch cancel {run_dir}")
        else:
            say(f"stopped following; the run keeps running. Follow again: launch logs {run_dir} --follow")
        return EXIT_CTRL_C
