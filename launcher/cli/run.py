"""`launch RECIPE ...` (a new run, here or on Slurm) and `launch --resume [RUN_DIR]` (continue one, on the same or
other resources)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from cluster.executor import Executor, PreparedRun, Submission
from cluster.local import LocalExecutor
from cluster.slurm import CLUSTER_FILE
from launcher.cli import args as cli_args
from launcher.cli.args import UsageError
from rich.markup import escape

from launcher.cli.console import console, info, warnings
from launcher.common import outcome
from launcher.common.rundir import read_plan, runs_of
from launcher.config.recipe import load_recipe


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch", description="Train from a recipe on this machine.",
                                     epilog="other commands: launch plan RECIPE ..., launch export RUN_DIR ...")
    cli_args.add_recipe_args(parser, recipe_required=False)
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="RUN_DIR",
                        help="continue the latest run of this recipe, or the given run directory, from its last "
                             "checkpoint; --procs/--nodes/--gpus-per-node resume it on another world size (the "
                             "global batch is kept: grad_accum absorbs the change)")
    parser.add_argument("--follow", "-f", action="store_true",
                        help="on Slurm: wait for the job, print rank 0's log as it grows and the job's state changes "
                             "(a requeued job is followed on), and exit with its exit code (0 completed, the run's "
                             "code when it failed, 6 cancelled, 7 timed out, 8 the job was lost); Ctrl-C stops "
                             "following, not the job. A run on this machine is in the foreground already: the flag "
                             "changes nothing there")
    parser.add_argument("--parallel", type=int, default=None, metavar="K",
                        help="a sweep on this machine: run K trials at once (they share its CPUs/GPUs; each writes "
                             "RUN_DIR/logs/console.log). Default 1; on Slurm, sweep.max_parallel throttles the array")
    return parser


def resume_dir(args: argparse.Namespace) -> Path:
    """The run directory given, or the latest run of the recipe that has checkpoints."""
    if args.resume != "latest":
        run_dir = Path(args.resume).resolve()
        read_plan(run_dir)  # clear error when it is not a run directory
        return run_dir
    if args.recipe is None:
        raise UsageError("--resume without a run directory needs the recipe: launch RECIPE --resume")
    loaded = load_recipe(args.recipe, args.overrides)
    name = loaded.recipe.output.name or loaded.recipe.name
    runs = [r for r in runs_of(Path(loaded.recipe.output.root).resolve(), name) if (r / "checkpoints").is_dir()]
    unfinished = [r for r in runs if not outcome.completed(r)]
    if not unfinished:
        done = f" ({len(runs)} completed)" if runs else ""
        raise UsageError(f"no unfinished run of {name!r} with checkpoints under {loaded.recipe.output.root}{done}: "
                         "nothing to resume")
    return unfinished[-1]


def _resume(args: argparse.Namespace) -> tuple[Executor, PreparedRun]:
    run_dir = resume_dir(args)
    if args.overrides:
        raise UsageError("overrides cannot change a run being resumed: its plan.json is the contract")
    was_slurm = (run_dir / CLUSTER_FILE).is_file()
    if cli_args.on_slurm(args) or (was_slurm and not cli_args.layout_given(args)):
        executor: Executor = cli_args.slurm_executor(args, resume=True)  # a Slurm run goes back to Slurm
        return executor, executor.prepare_resume(run_dir)
    executor = LocalExecutor(cli_args.local_resources(args))
    # re-planned here when resources are named now, or when a Slurm run comes to this machine
    return executor, executor.prepare_resume(run_dir, replan=cli_args.layout_given(args) or was_slurm)


def cmd_run(argv: Sequence[str]) -> int:
    args = parser().parse_intermixed_args(argv)
    if args.resume is not None and "=" in args.resume and not Path(args.resume).is_dir():
        args.overrides.insert(0, args.resume)  # `--resume key=value`: an override, not a run directory
        args.resume = "latest"
    if args.resume is None and args.recipe is None:
        raise UsageError("launch needs a recipe (launch RECIPE ...) or a run to resume (launch --resume RUN_DIR); "
                         "`launch --help` lists every command")
    if args.parallel is not None and args.parallel < 1:
        raise UsageError(f"--parallel must be >= 1 (got {args.parallel})")
    if args.resume is not None:
        if args.parallel is not None:
            raise UsageError("--parallel runs a sweep's trials side by side: `launch SWEEP.yaml --parallel K` "
                             "(it resumes the unfinished trials itself)")
        executor, run = _resume(args)
    else:
        loaded = load_recipe(args.recipe, args.overrides)
        if loaded.recipe.sweep is not None:
            from launcher.cli.sweep import run_sweep

            if args.follow:
                raise UsageError("--follow follows one run; a sweep's trials: launch status SWEEP_DIR (and "
                                 "launch logs TRIAL_DIR --follow for one of them)")

            return run_sweep(args, loaded)
        if args.parallel is not None:
            raise UsageError("--parallel runs the trials of a sweep side by side; this recipe has no `sweep:`")
        executor = cli_args.executor(args)
        run = executor.prepare(loaded)
    warnings(run.notes)
    info("resuming" if run.resumed and executor.kind == "local" else "run directory", str(run.run_dir))
    return report(executor.start(run), run, follow_job=args.follow)


def report(submission: Submission, run: PreparedRun, follow_job: bool = False) -> int:
    """What the user needs after a start: the exit code of a local run; the job id and how to follow a Slurm job,
    or (follow_job) its log and state until it ends, and its exit code."""
    if submission.job_id is None:
        return submission.returncode or 0
    for note in submission.notes:
        info("note:", note)
    console.print(f"[bold green]submitted[/] {escape(submission.description)}")
    if not follow_job:
        console.print(f"  follow: launch logs {run.run_dir} --follow    state: launch status {run.run_dir}    "
                      f"stop: launch cancel {run.run_dir}")
    print(submission.job_id, flush=True)  # stdout: the job id alone (first), for scripts
    if not follow_job:
        return 0
    from cluster.follow import follow
    from launcher.cli.runs import say

    console.print(f"  following rank 0's log (Ctrl-C stops following, not the job; stop it: launch cancel "
                  f"{run.run_dir})")
    # A resumed run's log holds its earlier attempts already: only what this one adds is new.
    return follow(run.run_dir, from_end=run.resumed, say=say)
