"""The follow loop of `launch --follow` / `launch logs --follow` (cluster/follow.py) on observations made up here: its
state machine (what it says, when it stops, the exit code) and its reading of a growing log. Following a real Slurm
job: tests/integration/test_slurm_launch.py."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cluster.follow import Follower, LogTail, exit_code, follow
from cluster.runs import RunStatus
from launcher.common.exits import EXIT_CTRL_C, EXIT_JOB_CANCELLED, EXIT_JOB_LOST, EXIT_JOB_TIMEOUT


def slurm(state: str, job_id: str = "12", **fields: Any) -> RunStatus:
    return RunStatus(run="r", run_dir="/runs/r", kind="slurm", state=state, job_id=job_id, **fields)


def observe_all(follower: Follower, timeline: list[tuple[float, RunStatus]]) -> tuple[list[str], list[bool]]:
    said, ended = [], []
    for now, status in timeline:
        lines, done = follower.observe(status, now)
        said += lines
        ended.append(done)
    return said, ended


def test_a_job_is_followed_through_its_tokenize_job_a_requeue_and_a_resubmission(tmp_path: Path) -> None:
    follower = Follower(tmp_path)
    said, ended = observe_all(follower, [
        (0, slurm("PENDING", prepare="11 RUNNING")),
        (5, slurm("PENDING", prepare="11 COMPLETED")),
        (10, slurm("RUNNING", node_list="node[1-2]", prepare="11 COMPLETED")),
        (15, slurm("RUNNING", node_list="node[1-2]", prepare="11 COMPLETED")),
        (20, slurm("REQUEUED", prepare="11 COMPLETED")),
        (25, slurm("PENDING", prepare="11 COMPLETED")),
        (30, slurm("RUNNING", node_list="node2", prepare="11 COMPLETED")),
        (35, slurm("CANCELLED", prepare="11 COMPLETED")),
        (40, slurm("PENDING", job_id="13")),  # `launch --resume` submitted it again: the same run
        (45, slurm("COMPLETED", job_id="13")),
    ])
    assert said == [
        "Slurm job 12: PENDING",
        "tokenize job 11: RUNNING (training starts after it)",
        "tokenize job 11: COMPLETED",
        "Slurm job 12: PENDING -> RUNNING on node[1-2]",
        "Slurm job 12: RUNNING -> REQUEUED (requeued: preemption or the time limit; the same run resumes from its "
        "last checkpoint)",
        "Slurm job 12: REQUEUED -> PENDING",
        "Slurm job 12: PENDING -> RUNNING on node2",
        "Slurm job 12: RUNNING -> CANCELLED",
        "Slurm job 13: the run was submitted again (was Slurm job 12); following it",
        "Slurm job 13: PENDING",
        "Slurm job 13: PENDING -> COMPLETED",
    ]
    assert ended == [False] * 7 + [True, False, True]  # the loop stops at the first end; observe keeps no memory of it


def test_a_preempted_job_is_waited_on_for_its_requeue_and_a_forgotten_one_is_given_up(tmp_path: Path) -> None:
    follower = Follower(tmp_path, lost_after_s=100)
    _, ended = observe_all(follower, [(0, slurm("RUNNING")), (5, slurm("PREEMPTED")), (40, slurm("PREEMPTED")),
                                      (45, slurm("PENDING")), (50, slurm("PREEMPTED")), (111, slurm("PREEMPTED"))])
    assert ended == [False, False, False, False, False, True]  # 60 s after the second PREEMPTED, not the first

    follower = Follower(tmp_path, lost_after_s=100)
    said, ended = observe_all(follower, [(0, slurm("UNKNOWN")), (50, slurm("PENDING")), (60, slurm("UNKNOWN")),
                                         (150, slurm("UNKNOWN")), (160, slurm("UNKNOWN"))])
    assert ended == [False, False, False, False, True]  # 100 s unknown in a row, counted from the last sighting
    assert "neither sacct nor squeue has known it for 100 s" in said[-1] and f"launch status {tmp_path}" in said[-1]


def test_a_local_run_that_ended_before_following_says_only_how(tmp_path: Path) -> None:
    local = RunStatus(run="r", run_dir=str(tmp_path), kind="local", state="FAILED", exit_code=2,
                      error=["data.jsonl: row 1: bad", "  more"])
    follower = Follower(tmp_path)
    lines, done = follower.observe(local, 0)
    assert (lines, done) == ([], True)
    assert follower.ending(local, exit_code(local, None))[:3] == [
        "run r ended: FAILED (exit code 2)", "error: data.jsonl: row 1: bad", "    more"]


@pytest.mark.parametrize("status, job_exit, code", [
    (slurm("COMPLETED"), None, 0),
    (slurm("FAILED", exit_code=2), 1, 2),  # rank 0's own code (bad input), not submitit's 1
    (slurm("FAILED", exit_code=None), 137, 137),  # killed before rank 0 recorded an end: the job's code
    (slurm("OUT_OF_MEMORY"), None, 1),
    (slurm("FAILED", exit_code=0), 0, 1),  # failed whatever rank 0 thought
    (slurm("CANCELLED", exit_code=3), None, EXIT_JOB_CANCELLED),
    (slurm("PREEMPTED"), None, EXIT_JOB_CANCELLED),
    (slurm("TIMEOUT", exit_code=3), None, EXIT_JOB_TIMEOUT),
    (slurm("CANCELLED", prepare="11 FAILED"), 1, 1),  # its tokenize job failed: a failure, not a cancel
    (RunStatus(run="r", run_dir="/r", kind="local", state="STOPPED", exit_code=3), None, 3),
    (RunStatus(run="r", run_dir="/r", kind="local", state="CRASHED"), None, 1),
])
def test_exit_codes(status: RunStatus, job_exit: int | None, code: int) -> None:
    assert exit_code(status, job_exit) == code


class FakeTime:
    """A clock that moves only when the loop sleeps; `on_sleep` changes the run directory meanwhile."""

    def __init__(self, on_sleep: Callable[[float], None]) -> None:
        self.now = 0.0
        self.on_sleep = on_sleep

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.on_sleep(self.now)


def append(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(text)


def test_the_log_is_streamed_as_it_grows_across_the_switch_to_rank0_log(tmp_path: Path) -> None:
    """The scheduler's output until the rank opens logs/rank0.log (read from its start then), lines cut mid-write
    printed whole, the state polled every 5 s and the code of the end returned."""
    (tmp_path / "plan.json").write_text(json.dumps({"world_size": 2}))
    (tmp_path / "jobs.jsonl").write_text(json.dumps({"event": "submitted", "job_id": "12"}) + "\n")
    scheduler_log = tmp_path / "submitit" / "x" / "12_0_log.out"
    rank0 = tmp_path / "logs" / "rank0.log"
    writes = {2.0: (scheduler_log, "srun: starting\n"), 3.0: (rank0, "step 1 loss 2.0\nstep 2 lo"),
              4.0: (rank0, "ss 1.5\n"), 9.0: (rank0, "outputs: adapter\nlast line, no newline")}
    states = iter([slurm("PENDING"), slurm("RUNNING", node_list="node1"), slurm("COMPLETED")])
    polls: list[float] = []
    fake = FakeTime(lambda now: append(*writes[now]) if now in writes else None)

    def watch(run_dir: Path) -> RunStatus:
        polls.append(fake.now)
        return next(states)

    out, said = io.StringIO(), []
    code = follow(tmp_path, say=said.append, out=out, watch=watch, job_exit=lambda job: 0, sleep=fake.sleep,
                  clock=fake.clock)
    assert code == 0 and polls == [0.0, 5.0, 10.0]
    assert out.getvalue() == ("srun: starting\nstep 1 loss 2.0\nstep 2 loss 1.5\noutputs: adapter\n"
                              "last line, no newline")
    assert said[:3] == ["Slurm job 12: PENDING", "Slurm job 12: PENDING -> RUNNING on node1",
                        "Slurm job 12: RUNNING -> COMPLETED"]
    assert said[3] == "Slurm job 12 ended: COMPLETED (exit code 0)"

    with pytest.raises(FileNotFoundError, match="ranks 0..1"):
        follow(tmp_path, rank=2, watch=watch)


def test_ctrl_c_stops_following_only_and_a_run_never_started_is_given_up(tmp_path: Path) -> None:
    (tmp_path / "plan.json").write_text(json.dumps({"world_size": 1}))
    said: list[str] = []

    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    code = follow(tmp_path, say=said.append, out=io.StringIO(), watch=lambda run_dir: slurm("RUNNING"),
                  sleep=interrupted)
    assert code == EXIT_CTRL_C
    assert said[-1] == (f"stopped following; Slurm job 12 keeps running. Follow again: launch logs {tmp_path} "
                        f"--follow    stop it: launch cancel {tmp_path}")

    fake = FakeTime(lambda now: None)
    planned = RunStatus(run="r", run_dir=str(tmp_path), kind="local", state="PLANNED")
    code = follow(tmp_path, say=said.append, out=io.StringIO(), watch=lambda run_dir: planned, sleep=fake.sleep,
                  clock=fake.clock, lost_after_s=30)
    assert code == EXIT_JOB_LOST and 30 <= fake.now <= 36
    assert said[-1] == f"run r has not started in 30 s: stopped following (start it: launch --resume {tmp_path})"


def test_last_lines_and_a_rewritten_log(tmp_path: Path) -> None:
    (tmp_path / "plan.json").write_text(json.dumps({"world_size": 1}))
    log = tmp_path / "logs" / "rank0.log"
    append(log, "a\nb\nc\n")
    for lines, shown in ((2, "b\nc\n"), (0, ""), (9, "a\nb\nc\n")):
        out = io.StringIO()
        LogTail(tmp_path, last_lines=lines).drain(out)
        assert out.getvalue() == shown
    tail, out = LogTail(tmp_path, from_end=True), io.StringIO()
    log.write_text("new\n")  # shorter than where the tail was: rewritten, read from its start
    tail.pump(out)
    assert out.getvalue() == "new\n"


def test_a_reader_that_leaves_early_is_not_an_error(tmp_path: Path) -> None:
    """`launch logs RUN | head -1`: the pipe closes while the log is written; exit 0, no traceback."""
    import subprocess
    import sys

    from launcher.cli.main import main

    repo = Path(__file__).resolve().parents[2]
    (tmp_path / "t.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "r.yaml").write_text(json.dumps({
        "name": "r", "model": {"path": str(repo / "recipes" / "models" / "llama-3.1-8b")},
        "data": {"train": {"path": str(tmp_path / "t.jsonl"), "format": "text"}}}))
    assert main(["plan", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "r"), "--gpus-per-node", "0"]) == 0
    logs = tmp_path / "r" / "logs"
    logs.mkdir(exist_ok=True)
    (logs / "rank0.log").write_text("".join(f"line {i} of a log longer than a pipe's buffer\n" for i in range(50_000)))
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "logs", str(tmp_path / "r"), "-n", "50000"], cwd=repo,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"line 0 of a log longer than a pipe's buffer\n"
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and b"Traceback" not in err, err.decode()
