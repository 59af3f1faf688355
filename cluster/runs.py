"""The run registry behind `launch runs / status / logs / cancel`.

A run is its directory (ARCHITECTURE.md). Slurm runs also hold RUN_DIR/jobs.jsonl (submissions, starts, requeues,
appended by cluster/slurm.py, cluster/slurm_task.py and job.sbatch); their state comes from `sacct` (accounting keeps
finished jobs) and, where accounting is missing, `squeue`. Local runs have no scheduler: their state is the outcome their
rank 0 recorded (RUN_DIR/outcome.json: running, completed, stopped, diverged, failed, crashed), or, for runs from
before that file, read from the run directory (outputs written = completed, metrics still growing = running).
"elapsed" is the time the run's attempts ran (outcome.json's attempts: no queue, no gap between a stop and its resume);
a failed run also shows its error (cluster/run_errors.py).

Planning side: standard library + rich, no torch.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from cluster.slurm import CLUSTER_FILE, JOBS_FILE, SlurmError
from launcher.common import outcome
from launcher.common.jsonl import read_jsonl
from launcher.common.rundir import METRICS_FILE, PLAN_FILE

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}
#: Slurm states of a job that still holds or waits for resources: a run with one is not resubmitted.
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                 "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT"}
#: Slurm states of a job whose ranks may be running (an open attempt of a pending or ended job was killed outright).
RUNNING_STATES = {"RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT"}
OUTPUT_DIRS = ("adapter", "model", "merged")
LOCAL_ENDED = ("COMPLETED", "STOPPED", "DIVERGED", "FAILED", "CRASHED")
#: A local run whose metrics.jsonl changed this recently is taken to be running.
LOCAL_RUNNING_WINDOW_S = 120
#: States (Slurm's, and a local run's outcome) of a run that ended in an error: `launch status` shows the error.
FAILED_STATES = {"FAILED", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "CRASHED", "DIVERGED"}


@dataclass
class RunStatus:
    """One run, as `launch status` shows it."""

    run: str
    run_dir: str
    kind: str
    """`slurm` or `local`."""
    state: str
    """Slurm state (PENDING, RUNNING, COMPLETED, ...) or, for local runs, PLANNED/RUNNING/STOPPED/COMPLETED."""
    job_id: str | None = None
    nodes: int = 1
    world_size: int = 1
    step: int | None = None
    total_steps: int | None = None
    last_loss: float | None = None
    elapsed: str | None = None
    """How long the run ran, HH:MM:SS (elapsed_s)."""
    elapsed_s: float | None = None
    """Seconds its attempts ran, summed (queue time and gaps between attempts left out); for runs from before
    attempts were recorded, the scheduler's elapsed time or the span of the run directory's writes."""
    node_list: str | None = None
    jobs: list[dict[str, Any]] = field(default_factory=list)
    """jobs.jsonl events, oldest first."""
    prepare: str | None = None
    """The CPU job the current training job waits for (`JOBID STATE`), when one was submitted."""
    outcome: str | None = None
    """How the job ended, as its rank 0 recorded it (launcher/common/outcome.py): running, completed, stopped,
    diverged, failed (bad input at start) or crashed."""
    exit_code: int | None = None
    reason: str | None = None
    eval_step: int | None = None
    eval: dict[str, float] = field(default_factory=dict)
    """The last evaluation's metrics (eval_loss, eval_accuracy, ...), at `eval_step`."""
    error: list[str] = field(default_factory=list)
    """For a failed run: its error, in a few lines (cluster/run_errors.py)."""

    @property
    def failed(self) -> bool:
        return self.state in FAILED_STATES or self.outcome in ("failed", "crashed", "diverged") or \
            self.prepare_failed

    @property
    def prepare_failed(self) -> bool:
        return self.prepare is not None and self.prepare.split()[-1] in FAILED_STATES | {"TIMEOUT"}

    @property
    def done(self) -> bool:
        return self.state in TERMINAL or (self.kind == "local" and self.state in LOCAL_ENDED)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def find_run(run: str, root: Path) -> Path:
    """A run directory from a path or a run name under `root`; FileNotFoundError saying what was tried."""
    for candidate in (Path(run), root / run):
        if (candidate / PLAN_FILE).is_file():
            return candidate.resolve()
    raise FileNotFoundError(f"no run {run!r}: neither {run} nor {root / run} holds a {PLAN_FILE}")


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    """RUN_DIR/jobs.jsonl, skipping a torn line."""
    return read_jsonl(run_dir / JOBS_FILE)


def job_ids(run_dir: Path) -> list[str]:
    """Slurm job ids of the run, in submission order, without repeats."""
    seen: dict[str, None] = {}
    for event in read_events(run_dir):
        if event.get("job_id"):
            seen.setdefault(str(event["job_id"]), None)
    return list(seen)


def slurm_state(job_id: str) -> tuple[str, str | None, str | None]:
    """(state, elapsed, node list) from sacct, else squeue; ("UNKNOWN", None, None) when neither knows the job."""
    if shutil.which("sacct"):
        out = _quiet(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "JobID,State,Elapsed,NodeList"])
        rows = [r.split("|") for r in out.splitlines() if r.split("|")[0] == job_id]
        if rows:
            _, state, elapsed, nodes = rows[-1]
            # "CANCELLED by 0" -> CANCELLED; a job that never started has the node list "None assigned"
            return state.split()[0], elapsed, None if nodes in ("", "None assigned") else nodes
    if shutil.which("squeue"):
        out = _quiet(["squeue", "-h", "-j", job_id, "-o", "%T|%M|%N"])
        if out.strip():
            state, elapsed, nodes = out.strip().splitlines()[0].split("|")
            return state, elapsed, nodes or None
    return "UNKNOWN", None, None


def slurm_exit_code(job_id: str) -> int | None:
    """The job's exit code from sacct (`CODE:SIGNAL`; killed by a signal: 128 + SIGNAL, as a shell says it); None
    when sacct does not know the job."""
    if shutil.which("sacct") is None:
        return None
    out = _quiet(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "JobID,ExitCode"])
    rows = [r.split("|") for r in out.splitlines() if r.split("|")[0] == job_id]
    if not rows:
        return None
    code, _, signal = rows[-1][1].partition(":")
    try:
        return 128 + int(signal) if signal and int(signal) else int(code)
    except ValueError:
        return None


def _quiet(cmd: list[str]) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return proc.stdout if proc.returncode == 0 else ""


def _last_rows(run_dir: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The last training and the last evaluation row of metrics.jsonl (one read)."""
    rows = read_jsonl(run_dir / METRICS_FILE)
    train = next((row for row in reversed(rows) if row.get("kind") == "train"), None)
    evaluated = next((row for row in reversed(rows) if row.get("kind") == "eval"), None)
    return train, evaluated


def _local_state(run_dir: Path) -> tuple[str, float | None]:
    """State and elapsed seconds of a run started on this machine: the outcome its rank 0 recorded, else (runs from
    before outcome.json) read from its files; the elapsed time is the span of its writes, idle time included (its
    attempts were not recorded)."""
    logs, metrics = run_dir / "logs", run_dir / METRICS_FILE
    if not logs.is_dir():
        return "PLANNED", None
    last = max((p.stat().st_mtime for p in (metrics, *logs.glob("rank*.log")) if p.exists()), default=None)
    elapsed = last - logs.stat().st_ctime if last else None
    recorded = outcome.read(run_dir)
    if recorded is not None:
        return recorded["outcome"].upper(), elapsed
    if any((run_dir / d).is_dir() for d in OUTPUT_DIRS):
        return "COMPLETED", elapsed
    if last is not None and time.time() - last < LOCAL_RUNNING_WINDOW_S:
        return "RUNNING", elapsed
    return "STOPPED", elapsed


def _seconds(clock: str | None) -> float | None:
    """Slurm's elapsed time ([D-]HH:MM:SS or MM:SS) in seconds."""
    if not clock:
        return None
    days, _, rest = clock.rpartition("-")
    try:
        parts = [int(x) for x in rest.split(":")]
        return float(sum(v * 60 ** i for i, v in enumerate(reversed(parts))) + int(days or 0) * 86400)
    except ValueError:
        return None


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def run_status(run_dir: Path) -> RunStatus:
    """The state of one run (see the module docstring for where each part comes from)."""
    plan = json.loads((run_dir / PLAN_FILE).read_text())
    events = read_events(run_dir)
    ids = job_ids(run_dir)
    slurm = bool(ids) or (run_dir / CLUSTER_FILE).is_file()
    row, evaluated = _last_rows(run_dir)
    status = RunStatus(run=run_dir.name, run_dir=str(run_dir), kind="slurm" if slurm else "local", state="",
                       nodes=plan.get("nodes", 1), world_size=plan.get("world_size", 1), jobs=events,
                       step=row.get("step") if row else None, last_loss=row.get("loss") if row else None,
                       total_steps=(plan.get("recipe", {}).get("optim", {}) or {}).get("max_steps"))
    if evaluated is not None:
        status.eval_step = evaluated.get("step")
        status.eval = {k: v for k, v in evaluated.items() if k.startswith("eval_") and isinstance(v, (int, float))}
    estimate: float | None = None  # for runs without recorded attempts
    running: bool | None = None  # whether the scheduler says the job runs (None: the run's own record says)
    if slurm and ids:
        status.job_id = ids[-1]
        status.state, sacct_elapsed, status.node_list = slurm_state(ids[-1])
        estimate = _seconds(sacct_elapsed)
        running = None if status.state == "UNKNOWN" else status.state in RUNNING_STATES
        prepare_id = _prepare_job(events)
        if prepare_id is not None:
            status.prepare = f"{prepare_id} {slurm_state(prepare_id)[0]}"
    elif slurm:
        status.state = "PLANNED"  # `launch plan --nodes N` wrote job.sbatch; nothing submitted yet
    else:
        status.state, estimate = _local_state(run_dir)
    ran = outcome.ran_seconds(run_dir, running=running)
    status.elapsed_s = ran if ran is not None else estimate
    status.elapsed = None if status.elapsed_s is None else _clock(status.elapsed_s)
    recorded = outcome.read(run_dir)
    if recorded is not None:
        status.outcome, status.exit_code, status.reason = recorded["outcome"], recorded.get("exit_code"), \
            recorded.get("reason")
    if status.failed:
        from cluster.run_errors import run_errors

        status.error = run_errors(run_dir, status.job_id, prepare_failed=status.prepare_failed)
    return status


def _prepare_job(events: list[dict[str, Any]]) -> str | None:
    """The tokenization job the last training submission depends on (`dependency: afterok:ID`), if any."""
    trains = [e for e in events if e.get("event") == "submitted" and e.get("kind", "train") == "train"]
    dependency = str(trains[-1].get("dependency") or "") if trains else ""
    return dependency.split(":", 1)[1] if dependency.startswith("afterok:") else None


def list_runs(root: Path, limit: int = 20) -> list[RunStatus]:
    """The `limit` most recently active runs under an output root, newest first."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if (p / PLAN_FILE).is_file()]

    def activity(p: Path) -> float:
        return max((f.stat().st_mtime for f in (p / PLAN_FILE, p / METRICS_FILE, p / JOBS_FILE) if f.exists()))

    return [run_status(p) for p in sorted(dirs, key=activity, reverse=True)[:limit]]


_STYLE = {"RUNNING": "green", "COMPLETED": "bold green", "PENDING": "yellow", "REQUEUED": "yellow",
          "FAILED": "red", "CANCELLED": "red", "TIMEOUT": "red", "STOPPED": "yellow", "NODE_FAIL": "red",
          "DIVERGED": "red", "CRASHED": "red"}


def _styled(state: str) -> str:
    style = _STYLE.get(state)
    return f"[{style}]{state}[/]" if style else state


def runs_table(runs: list[RunStatus]) -> Table:
    table = Table(title="runs")
    for column in ("run", "job id", "state", "nodes", "step", "last loss", "elapsed"):
        table.add_column(column, justify="right" if column in ("nodes", "step", "last loss") else "left")
    for r in runs:
        step = "-" if r.step is None else (f"{r.step}/{r.total_steps}" if r.total_steps else str(r.step))
        table.add_row(r.run, r.job_id or ("local" if r.kind == "local" else "-"), _styled(r.state), str(r.nodes),
                      step, "-" if r.last_loss is None else f"{r.last_loss:.4f}", r.elapsed or "-")
    if not runs:
        table.caption = "no runs"
    return table


def status_table(status: RunStatus) -> Table:
    table = Table(title=f"run {status.run}", show_header=False)
    table.add_row("run directory", status.run_dir)
    table.add_row("state", _styled(status.state) + ("" if status.kind == "slurm" else " (local run)"))
    if status.job_id:
        table.add_row("Slurm job", status.job_id + (f" on {status.node_list}" if status.node_list else ""))
    table.add_row("layout", f"{status.nodes} node(s), world size {status.world_size}")
    if status.prepare:
        waiting = status.prepare.split()[-1] not in TERMINAL
        table.add_row("tokenize job", status.prepare + (" (CPU; training starts after it)" if waiting else ""))
    if status.step is not None:
        table.add_row("step", f"{status.step}" + (f" of {status.total_steps}" if status.total_steps else ""))
    if status.last_loss is not None:
        table.add_row("last loss", f"{status.last_loss:.4f}")
    if status.eval:
        shown = ", ".join(f"{k.removeprefix('eval_')} {v:.4g}" for k, v in status.eval.items())
        table.add_row(f"last eval (step {status.eval_step})", shown)
    if status.elapsed:
        table.add_row("elapsed", status.elapsed)
    if status.outcome is not None and status.outcome != "running":
        ended = status.outcome + (f" (exit {status.exit_code})" if status.exit_code is not None else "")
        table.add_row("job ended", ended + (f": {escape(status.reason)}" if status.reason else ""))
    if status.error:
        table.add_row("[red]error[/]", escape("\n".join(status.error)))
    history = [f"{time.strftime('%H:%M:%S', time.localtime(e['time']))} {e['event']} {e.get('job_id', '')}"
               + (" (tokenize)" if e.get("kind") == "prepare" else "")
               + (f" (restart {e['restart']})" if e.get("restart") else "") for e in status.jobs if "time" in e]
    if history:
        table.add_row("history", "\n".join(history[-10:]))
    return table


# ----------------------------------------------------------------------------------------------------------- logs
def log_path(run_dir: Path, rank: int) -> Path | None:
    """Where rank R's log is: RUN_DIR/logs/rankR.log (written by the rank itself); before the rank has set up
    logging (or when it failed to start), the scheduler's output for that task."""
    own = run_dir / "logs" / f"rank{rank}.log"
    if own.is_file():
        return own
    ids = job_ids(run_dir)
    if ids:
        found = sorted(run_dir.glob(f"submitit/*/{ids[-1]}_{rank}_log.out"))
        if found:
            return found[-1]
        sbatch_out = run_dir / f"slurm-{ids[-1]}.out"
        if sbatch_out.is_file():
            return sbatch_out
    return None


# --------------------------------------------------------------------------------------------------------- cancel
def cancel_run(run_dir: Path) -> list[str]:
    """scancel the run's jobs that have not ended; returns what was done, line by line."""
    ids = job_ids(run_dir)
    if not ids:
        raise SlurmError(f"{run_dir} is not a Slurm run (no {JOBS_FILE}): stop a local run with Ctrl-C, which "
                         "writes a checkpoint first")
    if shutil.which("scancel") is None:
        raise SlurmError("Slurm not found: scancel is not on PATH")
    done = []
    for job_id in ids:
        state = slurm_state(job_id)[0]
        if state in TERMINAL:
            continue
        proc = subprocess.run(["scancel", job_id], capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise SlurmError(f"scancel {job_id} failed: {proc.stderr.strip()}")
        done.append(f"cancelled Slurm job {job_id} (was {state})")
    from cluster.slurm import record_event

    if done:
        record_event(run_dir, "cancelled", job_ids=[d.split()[3] for d in done])
    return done or [f"nothing to cancel: jobs {', '.join(ids)} have ended"]
