"""A plan's files in its run directory: plan.json, the strategy's config files, and the plan history of a run that
was re-planned on resume. Every command that creates or resumes a run writes and reads them through here."""

from __future__ import annotations

from pathlib import Path

from launcher.common.rundir import PLAN_FILE, PLAN_HISTORY_DIR, read_plan, write_json_atomic
from launcher.plan.build import Plan
from launcher.plan.strategy_config import write_strategy_files


def load_plan(run_dir: Path) -> Plan:
    """The typed plan of a run directory (a clear FileNotFoundError when it is not one)."""
    return Plan.from_json(read_plan(run_dir))


def write_plan(run_dir: Path, plan: Plan, keep_previous: bool = False) -> None:
    """plan.json and the strategy's files (ds_config.json); with keep_previous, the plan being replaced is kept as
    plan-history/NNN.json first (a resume that re-planned the run on other resources)."""
    if keep_previous and (run_dir / PLAN_FILE).is_file():
        history = run_dir / PLAN_HISTORY_DIR
        history.mkdir(exist_ok=True)
        number = len(list(history.glob("*.json"))) + 1
        write_json_atomic(history / f"{number:03d}.json", read_plan(run_dir))
    write_json_atomic(run_dir / PLAN_FILE, plan.to_json())
    write_strategy_files(run_dir, plan.to_json())
