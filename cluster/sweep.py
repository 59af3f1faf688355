"""A sweep on disk and how its trials run: SWEEP_DIR/sweep.json lists the trials (name, configuration, seed,
values, overrides); SWEEP_DIR/trials/<trial>/ is each trial's ordinary run directory (plan.json first, then what any
run writes). Submitting the same sweep again (same fingerprint, launcher/config/sweep.py) continues its directory:
completed trials are skipped, interrupted ones resume from their last checkpoint, planned ones start.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cluster.executor import Executor, PreparedRun, Submission
from launcher.common import outcome
from launcher.common.rundir import PLAN_FILE, claim_run_dir, is_suffixed, write_json_atomic
from launcher.config.sweep import SWEEP_FILE, TRIALS_DIR, Sweep, Trial


@dataclass(frozen=True)
class TrialState:
    trial: Trial
    run_dir: Path
    state: str
    """completed, failed, interrupted (checkpoints to resume from), planned (never started) or missing."""


def read_sweep(sweep_dir: Path) -> dict[str, Any]:
    path = sweep_dir / SWEEP_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{sweep_dir}: no {SWEEP_FILE} (not a sweep directory)")
    return json.loads(path.read_text())


def is_sweep_dir(path: Path) -> bool:
    return (path / SWEEP_FILE).is_file()


def existing_sweep_dir(sweep: Sweep) -> Path | None:
    """The latest directory of this sweep's name holding the same sweep (fingerprint), if any."""
    recipe = sweep.loaded.recipe
    root, name = Path(recipe.output.root).resolve(), recipe.output.name or recipe.name
    candidates = [p for p in root.glob(f"{name}*") if (p.name == name or is_suffixed(p.name, name)) and is_sweep_dir(p)]
    same = [p for p in candidates if read_sweep(p).get("fingerprint") == sweep.fingerprint()]
    return max(same, key=lambda p: (p / SWEEP_FILE).stat().st_mtime) if same else None


def sweep_json(sweep: Sweep, sweep_dir: Path) -> dict[str, Any]:
    config = sweep.config
    return {
        "recipe": str(sweep.loaded.source), "overrides": sweep.loaded.overrides, "fingerprint": sweep.fingerprint(),
        "metric": config.metric, "mode": config.mode, "configs": sweep.configs,
        "trials": [{"name": t.name, "config": t.config, "seed": t.seed, "values": t.values,
                    "overrides": t.overrides(sweep_dir)} for t in sweep.trials],
    }


def open_sweep_dir(sweep: Sweep) -> tuple[Path, bool]:
    """(directory, continued): the existing directory of the same sweep, else a newly claimed one with sweep.json."""
    found = existing_sweep_dir(sweep)
    if found is not None:
        return found, True
    recipe = sweep.loaded.recipe
    sweep_dir = claim_run_dir(Path(recipe.output.root).resolve(), recipe.output.name or recipe.name)
    write_json_atomic(sweep_dir / SWEEP_FILE, sweep_json(sweep, sweep_dir))
    return sweep_dir, False


def trial_dir(sweep_dir: Path, trial_name: str) -> Path:
    return sweep_dir / TRIALS_DIR / trial_name


def trial_state(run_dir: Path) -> str:
    if not (run_dir / PLAN_FILE).is_file():
        return "missing"
    if outcome.completed(run_dir):
        return "completed"
    if any((run_dir / "checkpoints").glob("step-*")):
        return "interrupted"
    ended = outcome.read(run_dir)
    return "failed" if ended is not None else "planned"


def states(sweep: Sweep, sweep_dir: Path) -> list[TrialState]:
    return [TrialState(t, trial_dir(sweep_dir, t.name), trial_state(trial_dir(sweep_dir, t.name)))
            for t in sweep.trials]


def plan_trials(sweep: Sweep, sweep_dir: Path, executor: Executor) -> None:
    """Write the run directory of every trial that has none yet (as `launch plan --out` does)."""
    for trial in sweep.trials:
        run_dir = trial_dir(sweep_dir, trial.name)
        if not (run_dir / PLAN_FILE).is_file():
            executor.dry_run(sweep.load_trial(trial, sweep_dir), run_dir)


CONSOLE_LOG = "logs/console.log"
"""A trial's terminal output when trials run side by side (`--parallel`), relative to its run directory."""


def run_locally(sweep: Sweep, sweep_dir: Path, executor: Executor,
                announce: Callable[[TrialState, int, int], None] = lambda *_: None,
                parallel: int = 1) -> dict[str, int]:
    """Every unfinished trial in the foreground, `parallel` at a time (sharing this machine's CPUs): planned ones
    start, interrupted and failed ones resume (a failed trial with no checkpoint starts again). Returns trial name
    -> exit code."""
    plan_trials(sweep, sweep_dir, executor)
    todo = [s for s in states(sweep, sweep_dir) if s.state != "completed"]
    if parallel > 1:
        return _run_side_by_side(todo, executor, announce, parallel)
    codes: dict[str, int] = {}
    for i, trial in enumerate(todo, start=1):
        announce(trial, i, len(todo))
        run: PreparedRun = executor.prepare_resume(trial.run_dir, replan=False)
        submission: Submission = executor.start(run)
        codes[trial.trial.name] = submission.returncode or 0
    return codes


def _run_side_by_side(todo: list[TrialState], executor: Executor,
                      announce: Callable[[TrialState, int, int], None], parallel: int) -> dict[str, int]:
    """Up to `parallel` trials at once, each a child process writing to its CONSOLE_LOG. On Ctrl-C (which every child
    receives too, and answers by checkpointing) no further trial starts and the running ones are waited for."""
    import time

    from cluster.local import start_background

    queue, running, codes = list(enumerate(todo, start=1)), {}, {}
    try:
        while queue or running:
            while queue and len(running) < parallel:
                i, trial = queue.pop(0)
                announce(trial, i, len(todo))
                run: PreparedRun = executor.prepare_resume(trial.run_dir, replan=False)
                running[trial.trial.name] = start_background(run.plan, trial.run_dir / CONSOLE_LOG, parallel)
            for name, process in list(running.items()):
                if process.poll() is not None:
                    codes[name] = process.returncode
                    del running[name]
            time.sleep(0.2)
    except KeyboardInterrupt:
        for name, process in running.items():  # they are writing their checkpoints
            codes[name] = process.wait()
    return codes


def submit_to_slurm(sweep: Sweep, sweep_dir: Path, executor: Any) -> tuple[list[Submission], list[TrialState]]:
    """The unfinished trials as one Slurm job array (cluster/slurm.py `submit_array`); trials with a job still queued
    or running are left alone (returned second): submitting the sweep again never runs a trial twice at once."""
    from cluster.runs import ACTIVE_STATES, run_status
    from cluster.slurm import JOBS_FILE

    plan_trials(sweep, sweep_dir, executor)
    todo, active = [], []
    for state in states(sweep, sweep_dir):
        if state.state == "completed":
            continue
        if (state.run_dir / JOBS_FILE).is_file() and run_status(state.run_dir).state in ACTIVE_STATES:
            active.append(state)
        else:
            todo.append(state)
    if not todo:
        return [], active
    runs = [executor.prepare_resume(state.run_dir, replan=False) for state in todo]
    recipe = sweep.loaded.recipe
    return executor.start_array(sweep_dir / "submitit", recipe.output.name or recipe.name, runs,
                                sweep.config.max_parallel), active

