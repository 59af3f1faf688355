"""The run directory: the contract between planning and the job (docs/architecture.md).

    RUN_DIR/.claimed          created (O_EXCL) by the launch that owns the directory
    RUN_DIR/plan.json         resolved recipe + plan (written by `launch`, and by `launch plan --out RUN_DIR`)
    RUN_DIR/baseline.json     the baselines a run must beat (`launch baseline`, launcher/train/baseline.py)
    RUN_DIR/ds_config.json    DeepSpeed config, where DeepSpeed is used
    RUN_DIR/plan-history/     earlier plan.json files, kept when a resume re-planned the run (another world size)
    RUN_DIR/job.sbatch        the Slurm job, where submitted to Slurm (plain `sbatch` runs it too)
    RUN_DIR/cluster.json      the Slurm layout and settings it was submitted with (read by `launch --resume`)
    RUN_DIR/jobs.jsonl        Slurm history: one line per submission, start, requeue, cancel
    RUN_DIR/logs/             one log per rank (rankR.log), and prepare.log of the tokenize-first job
    RUN_DIR/checkpoints/      step-NNNNNNNN/ directories and the `latest` pointer
    RUN_DIR/metrics.jsonl     one JSON object per logged step / evaluation
    RUN_DIR/outcome.json      how the job ended (launcher/common/outcome.py)
    RUN_DIR/tracking.json     W&B / MLflow run ids: a resume continues the same tracker runs (train/tracking.py)
    RUN_DIR/wandb/, mlflow.db, mlartifacts/   the trackers' local files (W&B's dir, MLflow's default store)
    RUN_DIR/adapter|model|merged/   final outputs

A run directory is never overwritten nor shared: a new run of the same recipe gets a suffix (`demo-2`), also when two
start at once. A directory holding only a `plan.json` and/or a `baseline.json` (`launch plan --out runs/demo`,
`launch baseline`) is a planned, not-yet-started run, and the next `launch` of that run name takes it over.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

PLAN_FILE = "plan.json"
PLAN_HISTORY_DIR = "plan-history"
METRICS_FILE = "metrics.jsonl"
BASELINE_FILE = "baseline.json"
PLANNING_FILES = (PLAN_FILE, BASELINE_FILE)
"""What the planning side may write into a run directory before a launch takes it (it stays fresh)."""
CLAIM_FILE = ".claimed"
"""Created (O_EXCL) by the launch that owns a run directory: of two launches racing for one name, one gets it."""


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=False)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Write a text file atomically (sbatch files, pointers)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def is_fresh(run_dir: Path) -> bool:
    """True for a directory holding nothing but a plan and/or a baseline (planned, never started); a leftover
    temporary file of their atomic writes counts as theirs."""
    temporary = tuple(f".{name}." for name in PLANNING_FILES)
    return run_dir.is_dir() and all(p.name in PLANNING_FILES or p.name.startswith(temporary) for p in run_dir.iterdir())


def next_run_dir(root: Path, name: str) -> Path:
    """The directory the next run of `name` goes to: `root/name`, or the first free `root/name-N`.

    A fresh (planned only) directory is returned as is, so `launch plan --out runs/NAME` then `launch` use the same
    run directory.
    """
    for index in range(1, 10_000):
        candidate = root / (name if index == 1 else f"{name}-{index}")
        if not candidate.exists() or is_fresh(candidate):
            return candidate
    raise RuntimeError(f"more than 10000 runs named {name!r} under {root}")


def claim_run_dir(root: Path, name: str, *, own: bool = True) -> Path:
    """Create (or reuse, when only planned) and return the next run directory of `name`.

    own=True (a launch): the directory becomes this process's alone. Two launches racing for one name both may see
    it free, but only one creates its CLAIM_FILE (O_EXCL, atomic on local and NFSv3+ file systems); the other
    moves on to the next name. own=False (`launch plan`): the directory stays free for the next launch to reuse."""
    root.mkdir(parents=True, exist_ok=True)
    while True:
        candidate = next_run_dir(root, name)
        try:
            candidate.mkdir()
        except FileExistsError:
            if not is_fresh(candidate):
                continue  # another launch took it between our look and our mkdir
        if not own:
            return candidate
        try:
            fd = os.open(candidate / CLAIM_FILE, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{os.uname().nodename} {os.getpid()}\n")
        return candidate


def release_run_dir(run_dir: Path) -> None:
    """Give back a directory claimed by a launch that was then refused: it is removed when nothing else was written
    to it, and is free again (a planned run) when it held a plan before."""
    (run_dir / CLAIM_FILE).unlink(missing_ok=True)
    try:
        run_dir.rmdir()  # only succeeds while it is empty
    except OSError:
        pass


def runs_of(root: Path, name: str) -> list[Path]:
    """Existing run directories of a run name, oldest first (by plan.json time)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and (p.name == name or is_suffixed(p.name, name))
             and (p / PLAN_FILE).is_file()]
    return sorted(found, key=lambda p: (p / PLAN_FILE).stat().st_mtime)


def is_suffixed(candidate: str, name: str) -> bool:
    """`name-N` (N digits): another run of `name`, as next_run_dir numbers them."""
    head, sep, tail = candidate.rpartition("-")
    return bool(sep) and head == name and tail.isdigit()


def read_baseline(run_dir: Path) -> dict[str, Any] | None:
    """The baseline.json of a run directory (`launch baseline`), or None when it has none."""
    path = run_dir / BASELINE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def read_plan(run_dir: Path) -> dict[str, Any]:
    """The plan.json of a run directory, with a clear error when it is missing."""
    path = run_dir / PLAN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: {PLAN_FILE} is missing")
    return json.loads(path.read_text())
