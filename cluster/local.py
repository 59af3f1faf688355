"""Local executor: run a plan on this machine (one process, or N ranks under torchrun), in the foreground.

The job always runs in a child process, so the launcher stays torch-free and a Ctrl-C reaches the ranks, which write a
checkpoint before exiting; the launcher waits for that instead of dying first.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

from rich.console import Console

from cluster.executor import (Executor, PreparedRun, Submission, loaded_from_plan, refuse_completed,
                              require_runnable, resume_notes)
from launcher.config.recipe import LoadedRecipe
from launcher.plan.build import make_plan, replan_for_resume
from launcher.plan.files import load_plan
from launcher.plan.resources import Resources

console = Console(stderr=True, highlight=False, soft_wrap=True)


def rank_environment(plan: Any, jobs: int = 1) -> dict[str, str]:
    """The environment of the job's processes; `jobs`: how many such jobs run on this machine at once (a sweep's
    `--parallel`), which share its CPUs."""
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")  # the job reads local files only; never wait on a hub
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if plan.device == "cpu" and (plan.world_size > 1 or jobs > 1):
        # The node's CPUs shared by its ranks. Set here because torchrun would otherwise set 1 for every rank, and the
        # ranks honour an explicit OMP_NUM_THREADS (launcher/train/job.py, cpu_threads).
        cores = len(os.sched_getaffinity(0))
        env.setdefault("OMP_NUM_THREADS", str(max(1, cores // max(1, plan.procs_per_node * jobs))))
        if plan.world_size > 1:
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # local ranks talk over loopback
    return env


def start_background(plan: Any, output: Path, jobs: int) -> subprocess.Popen[bytes]:
    """Start the plan's local command with its output appended to `output` (several jobs at once would interleave
    on one terminal); the caller waits. Ctrl-C still reaches it (same process group)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "ab") as sink:
        return subprocess.Popen(plan.command, env=rank_environment(plan, jobs), stdout=sink,
                                stderr=subprocess.STDOUT)


def run_local(plan: Any) -> int:
    """Run the plan's local command; return its exit code (0 done, 2 bad input, 3 interrupted and resumable)."""
    process = subprocess.Popen(plan.command, env=rank_environment(plan))
    while True:
        try:
            return process.wait()
        except KeyboardInterrupt:
            # The child got the same SIGINT (same process group) and is checkpointing: wait for it.
            console.print("[yellow]interrupt received: waiting for the job to write its checkpoint "
                          "(press Ctrl-C again to abort)[/]")
            try:
                return process.wait()
            except KeyboardInterrupt:
                process.send_signal(signal.SIGINT)
                return process.wait()


class LocalExecutor(Executor):
    """This machine, on the given resources (nodes=1)."""

    kind = "local"

    def __init__(self, resources: Resources) -> None:
        self.resources = resources

    def plan_run(self, loaded: LoadedRecipe, run_dir: Path) -> PreparedRun:
        return PreparedRun(run_dir=run_dir, plan=make_plan(loaded, self.resources, run_dir), loaded=loaded)

    def prepare_resume(self, run_dir: Path, *, replan: bool = True) -> PreparedRun:
        refuse_completed(run_dir)
        plan = load_plan(run_dir)
        if not replan:
            return PreparedRun(run_dir=run_dir, plan=plan, loaded=loaded_from_plan(plan), resumed=True)
        plan = replan_for_resume(plan, self.resources, run_dir)  # here, on the resources named now
        require_runnable(plan)
        run = PreparedRun(run_dir=run_dir, plan=plan, loaded=loaded_from_plan(plan), resumed=True,
                          notes=resume_notes(plan))
        self.write(run, keep_previous=True)
        return run

    def start(self, run: PreparedRun) -> Submission:
        return Submission(run_dir=run.run_dir, returncode=run_local(run.plan))
