"""Sweeps at the command line: `launch plan SWEEP` (the trial table and a GPU-hours estimate), `launch SWEEP` (every
trial, here one after another), `launch report SWEEP_DIR` (mean ± std per configuration) and the sweep form of
`launch status` / `launch cancel`. A sweep is a recipe with a `sweep:` section (launcher/config/sweep.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

from rich.markup import escape
from rich.table import Table

from cluster.executor import Executor
from cluster.runs import cancel_run, run_status
from cluster.slurm import JOBS_FILE
from cluster.sweep import (CONSOLE_LOG, TrialState, open_sweep_dir, read_sweep, run_locally, submit_to_slurm,
                           trial_state)
from launcher.cli import args as cli_args
from launcher.cli.console import console, info, wide_console
from launcher.common.sweep_report import REPORT_MD, REPORT_PNG, best, final_values, write_report
from launcher.config.recipe import LoadedRecipe
from launcher.config.sweep import Sweep, load_sweep


def _values(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()) or "(recipe)"


def plan_sweep(args: argparse.Namespace, loaded: LoadedRecipe, as_json: bool) -> int:
    """Every trial validated and planned on the resources asked for (nothing written); the trial table and the
    estimate: trials x GPUs per trial x max_steps x sweep.seconds_per_step."""
    sweep = load_sweep(loaded.source, loaded.overrides)
    executor = cli_args.executor(args)
    root = Path(loaded.recipe.output.root).resolve() / (loaded.recipe.output.name or loaded.recipe.name)
    trials = {t.config: sweep.load_trial(t, root) for t in sweep.trials}  # the seeds of a configuration plan alike
    plans = {config: executor.plan(trial) for config, trial in trials.items()}
    per_trial = next(iter(plans.values()))
    gpus = per_trial.nodes * per_trial.gpus_per_node
    steps_of = {config: trial.recipe.optim.max_steps for config, trial in trials.items()}  # a grid may sweep them
    steps = steps_of[0] if len(set(steps_of.values())) == 1 else None
    seconds = sweep.config.seconds_per_step
    hours = None
    if seconds and all(steps_of.values()):
        device_steps = sum(max(plans[t.config].nodes * plans[t.config].gpus_per_node, 1) * (steps_of[t.config] or 0)
                           for t in sweep.trials)
        hours = device_steps * seconds / 3600
    if as_json:
        print(json.dumps({"trials": [{"name": t.name, "config": t.config, "seed": t.seed, "values": t.values}
                                     for t in sweep.trials], "gpus_per_trial": gpus, "max_steps": steps,
                          "seconds_per_step": seconds, "gpu_hours": hours}, indent=2))
        return 0
    table = Table(title=f"sweep {escape(loaded.recipe.name)}: {len(sweep.configs)} configuration(s) x "
                        f"{len(sweep.trials) // max(len(sweep.configs), 1)} seed(s) = {len(sweep.trials)} trials")
    for column in ("trial", "values", "seed", "strategy", "steps"):
        table.add_column(column)
    for trial in sweep.trials:
        plan = plans[trial.config]
        table.add_row(trial.name, escape(_values(trial.values)), str(trial.seed), plan.strategy,
                      str(steps_of[trial.config] or "epochs"))
    out = wide_console()
    out.print(table)
    unit = "GPU-hours" if gpus else "CPU-hours (no GPU)"
    if hours is not None:
        out.print(f"estimate: {len(sweep.trials)} trials x {max(gpus, 1)} x {steps or 'their'} steps x {seconds} s"
                  f" = {hours:.2f} {unit}")
    else:
        out.print("estimate: set optim.max_steps and sweep.seconds_per_step (seconds per step of one trial) for "
                  "the GPU-hours")
    out.print(f"ranked by {sweep.config.metric} ({sweep.config.mode}); run: launch {escape(str(loaded.source))}")
    return 0


def run_sweep(args: argparse.Namespace, loaded: LoadedRecipe) -> int:
    sweep: Sweep = load_sweep(loaded.source, loaded.overrides)
    executor: Executor = cli_args.executor(args)
    sweep_dir, continued = open_sweep_dir(sweep)
    info("sweep", f"{sweep_dir} ({len(sweep.trials)} trials{', continued' if continued else ''})")
    if executor.kind == "slurm":
        if getattr(args, "parallel", None) is not None:
            raise cli_args.UsageError("--parallel is for trials on this machine; on Slurm, sweep.max_parallel "
                                      "throttles the job array")
        return _submit(sweep, sweep_dir, executor)

    parallel = getattr(args, "parallel", None) or 1

    def announce(state: TrialState, i: int, n: int) -> None:
        verb = {"planned": "starting", "missing": "starting"}.get(state.state, "resuming")
        where = f"; output in {state.run_dir / CONSOLE_LOG}" if parallel > 1 else ""
        info(f"trial {i}/{n}", f"{verb} {state.trial.name} ({_values(state.trial.values)}, seed {state.trial.seed})"
                               f"{where}")

    codes = run_locally(sweep, sweep_dir, executor, announce, parallel=parallel)
    if not codes:
        info("sweep", "every trial has completed: nothing to run")
    failed = {name: code for name, code in codes.items() if code != 0}
    _print_results(*write_report(sweep_dir))
    info("report", f"{sweep_dir / REPORT_MD}, {sweep_dir / REPORT_PNG}")
    if failed:
        console.print(f"[red]trials that did not complete:[/] {escape(', '.join(sorted(failed)))} "
                      f"(launch {escape(str(loaded.source))} again resumes them)")
        return max(failed.values())
    return 0


def _submit(sweep: Sweep, sweep_dir: Path, executor: Executor) -> int:
    submissions, active = submit_to_slurm(sweep, sweep_dir, executor)
    for state in active:
        info("still queued or running", f"{state.trial.name}: left alone")
    if not submissions:
        info("sweep", "nothing to submit: " + ("every trial has completed" if not active else "the rest is queued"))
        return 0
    for note in submissions[0].notes:
        info("note:", note)
    array = submissions[0].job_id.split("_")[0] if submissions[0].job_id else "?"
    console.print(f"[bold green]submitted[/] Slurm array {array}: {len(submissions)} trial(s) "
                  f"({escape(', '.join(s.run_dir.name for s in submissions))})"
                  + (f", at most {sweep.config.max_parallel} at once" if sweep.config.max_parallel else ""))
    console.print(f"  state: launch status {sweep_dir}    report: launch report {sweep_dir}    "
                  f"stop: launch cancel {sweep_dir}")
    print(array)  # stdout: the array's job id alone, for scripts
    return 0


def _print_results(sweep: dict[str, Any], results: list[Any], baseline: dict[str, Any] | None = None) -> None:
    top = best(results, sweep["mode"])
    table = Table(title=f"{escape(sweep['metric'])} over seeds ({sweep['mode']} is best)")
    for column in ("config", "values", "mean", "std", "n"):
        table.add_column(column)
    for r in results:
        name = f"c{r.config}" + (" (best)" if top is not None and r.config == top.config else "")
        table.add_row(name, escape(_values(r.values)), "n/a" if r.mean is None else f"{r.mean:.4g}",
                      "n/a" if r.std is None else f"{r.std:.4g}", f"{r.n}/{len(r.trials)}")
    if baseline is not None:
        table.add_row(f"baseline: {escape(baseline['name'])}", "launch baseline", f"{baseline['value']:.4g}", "", "")
    wide_console().print(table)


def cmd_report(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="launch report", description="Mean ± std per configuration of a sweep.")
    parser.add_argument("sweep_dir", type=Path, help="the sweep directory (holds sweep.json)")
    parser.add_argument("--json", action="store_true", help="print report.json instead of the table")
    args = parser.parse_args(argv)
    sweep_dir = args.sweep_dir.resolve()
    sweep, results, baseline = write_report(sweep_dir)
    if args.json:
        print((sweep_dir / "report.json").read_text())
    else:
        _print_results(sweep, results, baseline)
        info("written", f"{sweep_dir / REPORT_MD}, {sweep_dir / REPORT_PNG}")
    return 0


def sweep_cancel(sweep_dir: Path) -> list[str]:
    """Cancel every trial's queued or running Slurm job."""
    done = []
    for trial in read_sweep(sweep_dir)["trials"]:
        run_dir = sweep_dir / "trials" / trial["name"]
        if (run_dir / JOBS_FILE).is_file():
            done += [f"{trial['name']}: {line}" for line in cancel_run(run_dir)]
    return done or ["nothing to cancel: no trial was submitted to Slurm"]


def sweep_status(sweep_dir: Path, as_json: bool) -> int:
    """Every trial's state, last step and latest value of the sweep's metric."""
    sweep = read_sweep(sweep_dir)
    rows = []
    for trial in sweep["trials"]:
        run_dir = sweep_dir / "trials" / trial["name"]
        last = final_values(run_dir, ("step", sweep["metric"]))
        step = last["step"]
        state = trial_state(run_dir)
        if state != "completed" and (run_dir / JOBS_FILE).is_file():
            state = run_status(run_dir).state  # the scheduler's word: PENDING, RUNNING, REQUEUED, ...
        rows.append({"trial": trial["name"], "state": state,
                     "step": None if step is None else int(step),
                     sweep["metric"]: last[sweep["metric"]]})
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title=f"sweep {escape(str(sweep_dir))}")
    for column in ("trial", "state", "step", sweep["metric"]):
        table.add_column(escape(column))
    for row in rows:
        value = row[sweep["metric"]]
        table.add_row(row["trial"], row["state"], str(row["step"] or "-"), "-" if value is None else f"{value:.4g}")
    wide_console().print(table)
    return 0


__all__ = ["plan_sweep", "run_sweep", "cmd_report", "sweep_status", "sweep_cancel"]
