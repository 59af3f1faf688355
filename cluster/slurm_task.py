"""The function every submitit task runs (see cluster/slurm.py for how signals and requeues fit together).

Apart from cluster/slurm.py so that `launch plan` does not import submitit; pickled by reference, so the job's
Python must be able to import `cluster.slurm_task` (the ftlaunch package installed, or on PYTHONPATH).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from submitit.helpers import Checkpointable, DelayedSubmission

from cluster.events import EXIT_INTERRUPTED, SIGNAL_DELAY_S, record_event


class RankTask(Checkpointable):
    """What every submitit task runs: the rank entry point for one run directory, as a child process.

    Picklable and small: it holds the run directory, the non-secret environment and the requeue budget only."""

    def __init__(self, run_dir: str, env: dict[str, str], stop_timeout_s: float = SIGNAL_DELAY_S - 15) -> None:
        self.run_dir = run_dir
        self.env = dict(env)
        self.stop_timeout_s = stop_timeout_s
        self._child: subprocess.Popen[bytes] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_child"] = None  # a process handle does not survive a requeue
        return state

    def __call__(self) -> dict[str, Any]:
        rank = int(os.environ.get("SLURM_PROCID", "0"))
        job_id = slurm_job_id()
        if rank == 0:
            record_event(Path(self.run_dir), "started", job_id=job_id, via="submitit",
                         restart=int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
                         nodes=os.environ.get("SLURM_JOB_NODELIST", ""))
        env = {**os.environ, **self.env}
        self._child = subprocess.Popen([sys.executable, "-m", "launcher.train.job", self.run_dir], env=env)
        # Poll rather than Popen.wait(): wait() holds the waitpid lock while blocked, and checkpoint() (run by the
        # signal handler in this thread) must be able to reap the child itself.
        while (code := self._child.poll()) is None:
            time.sleep(0.2)
        if code == 0:
            return {"rank": rank, "exit": 0}
        if code == EXIT_INTERRUPTED:
            # Stopped by SIGTERM/SIGUSR1 after a checkpoint: Slurm (scontrol requeue, scancel) or rank 0's
            # requeue is about to end this task. Returning would record a result for a run that is not done.
            time.sleep(SIGNAL_DELAY_S)
            raise RuntimeError(f"rank {rank} stopped by a signal after a checkpoint; resume with "
                               f"`launch --resume {self.run_dir}`")
        raise RuntimeError(f"rank {rank} exited {code}: see {self.run_dir}/logs/rank{rank}.log")

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Called by submitit on global rank 0 when the preemption signal arrives: make sure the trainer has
        written its checkpoint and exited, then hand submitit a fresh task to requeue."""
        child = self._child
        if child is not None and child.returncode is None:
            try:
                os.kill(child.pid, signal.SIGUSR1)  # no-op if Slurm signalled it too: the flag is already set
            except ProcessLookupError:
                pass
            _wait_pid(child.pid, self.stop_timeout_s)
        record_event(Path(self.run_dir), "requeued", job_id=slurm_job_id(),
                     restart=int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0))
        return DelayedSubmission(RankTask(self.run_dir, self.env, self.stop_timeout_s))


def slurm_job_id() -> str:
    """This job's id as sacct and squeue take it: `ARRAY_INDEX` for an element of a job array (a sweep's trial),
    whose own SLURM_JOB_ID sacct -j does not find."""
    array, index = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{index}" if array and index else os.environ.get("SLURM_JOB_ID", "")


def _wait_pid(pid: int, timeout_s: float) -> None:
    """Wait for a child to exit without Popen's lock (see RankTask.__call__)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # already reaped
            return
        if done:
            return
        time.sleep(0.2)


class PrepareTask:
    """The CPU-only job before training (launcher/train/prepare.py): converts the model and tokenizes the data into the
    shared cache. Fails the job (so `afterok` cancels training) when preparation fails."""

    def __init__(self, run_dir: str, env: dict[str, str]) -> None:
        self.run_dir = run_dir
        self.env = dict(env)

    def __call__(self) -> dict[str, Any]:
        import submitit

        job = submitit.JobEnvironment()
        task, tasks = job.global_rank, job.num_tasks
        if task == 0:
            record_event(Path(self.run_dir), "started", job_id=str(job.job_id), via="submitit", kind="prepare",
                         nodes=os.environ.get("SLURM_JOB_NODELIST", ""), tasks=tasks)
        command = [sys.executable, "-m", "launcher.train.prepare", self.run_dir]
        if tasks > 1:
            # the tasks share a work directory named by the attempt: a requeued job starts a fresh one
            attempt = f"{job.job_id}-{os.environ.get('SLURM_RESTART_COUNT', '0')}"
            command += ["--task", str(task), "--tasks", str(tasks), "--attempt", attempt]
        code = subprocess.call(command, env={**os.environ, **self.env})
        if code != 0:
            raise RuntimeError(f"preparing the data exited {code}: see {self.run_dir}/logs/prepare*.log")
        return {"prepared": self.run_dir, "task": task}
