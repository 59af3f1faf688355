"""The `launch` command.

    launch RECIPE [key.path=value ...] [--procs N]                            train on this machine
    launch --resume RUN_DIR [--procs N | --nodes N ...]   continue a run, on the same or other resources
    launch plan RECIPE [key.path=value ...] [--nodes N] [--gpus-per-node G] [--procs N] [--json]
    launch export RUN_DIR [--merge] [--out DIR]
    launch RECIPE --nodes N | --cluster NAME [--partition P] [--time T] [--gpus-per-node G]   submit to Slurm
    launch runs [--root DIR] | status RUN | logs RUN [--rank R] [--follow] | cancel RUN        run management

Planning side: this module imports no torch, transformers, peft or deepspeed (a test checks). Training starts in
`launcher.train.job`, imported only when a run begins.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from rich.console import Console

from launcher.plan.strategy_config import write_strategy_files
from launcher.plan.build import Plan, Resources, local_gpu_count, make_plan, replan_for_resume
from launcher.plan.memory import parse_size
from launcher.config.recipe import LoadedRecipe, RecipeError, load_recipe
from launcher.common.rundir import PLAN_FILE, claim_run_dir, next_run_dir, read_plan, runs_of, write_json_atomic

if TYPE_CHECKING:
    from cluster.slurm import SlurmSettings
    from launcher.config.schema import Recipe

SUBCOMMANDS = ("plan", "export", "runs", "status", "logs", "cancel")
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

console = Console(stderr=True, highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------------------------------- arguments
def _add_recipe_args(parser: argparse.ArgumentParser, recipe_required: bool = True) -> None:
    parser.add_argument("recipe", nargs=None if recipe_required else "?", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="recipe overrides, e.g. optim.lr=1e-4")
    # Default None, not 1: a resumed run tells "not given" (keep the run's layout) from an explicit `--nodes 1`.
    parser.add_argument("--nodes", type=int, default=None, help="number of nodes (default 1: this machine)")
    parser.add_argument("--gpus-per-node", type=int, default=None,
                        help="GPUs per node (default: the GPUs visible here; 0 trains on CPU)")
    parser.add_argument("--procs", type=int, default=None,
                        help="ranks per node (default: one per GPU, or 1 on CPU)")
    parser.add_argument("--gpu-mem", default=None, metavar="SIZE",
                        help="memory of one GPU, e.g. 80GiB: enables fits/auto choices of the memory planner")
    slurm = parser.add_argument_group("Slurm (used when --nodes > 1 or --cluster is given)")
    slurm.add_argument("--cluster", default=None, metavar="NAME",
                       help="cluster profile cluster/profiles/NAME.yaml (default: $FTLAUNCH_CLUSTER, else local)")
    slurm.add_argument("--partition", default=None, help="Slurm partition (overrides profile and recipe)")
    slurm.add_argument("--time", default=None, help="time limit, Slurm format: MM, HH:MM:SS, D-HH:MM:SS")


def _run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch", description="Train from a recipe on this machine.",
                                     epilog="other commands: launch plan RECIPE ..., launch export RUN_DIR ...")
    _add_recipe_args(parser, recipe_required=False)
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="RUN_DIR",
                        help="continue the latest run of this recipe, or the given run directory, from its last "
                             "checkpoint; --procs/--nodes/--gpus-per-node resume it on another world size (the "
                             "global batch is kept: grad_accum absorbs the change)")
    return parser


def _plan_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch plan", description="Resolve a recipe into a plan; runs nothing.")
    _add_recipe_args(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    return parser


def _export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch export", description="Write a run's latest checkpoint as an HF model.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--merge", action="store_true", help="fold a LoRA adapter into the base weights")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default RUN_DIR/export)")
    return parser


class UsageError(Exception):
    """Bad command-line input (not a recipe problem)."""


def _nodes(args: argparse.Namespace) -> int:
    nodes = 1 if args.nodes is None else args.nodes
    if nodes < 1:
        raise UsageError(f"--nodes must be >= 1 (got {nodes})")
    return nodes


def _layout_given(args: argparse.Namespace) -> bool:
    """Whether the command line names resources (a resumed run otherwise keeps the ones it was planned for)."""
    return any(v is not None for v in (args.nodes, args.procs, args.gpus_per_node, args.cluster))


def _resources(args: argparse.Namespace) -> Resources:
    nodes = _nodes(args)
    gpus = local_gpu_count() if args.gpus_per_node is None else args.gpus_per_node
    if gpus < 0:
        raise UsageError(f"--gpus-per-node must be >= 0 (got {gpus})")
    procs = args.procs if args.procs is not None else max(gpus, 1)
    if procs < 1:
        raise UsageError(f"--procs must be >= 1 (got {procs})")
    if gpus and procs > gpus:
        raise UsageError(f"--procs({procs}) > --gpus-per-node({gpus}): one rank per GPU at most")
    return Resources(nodes=nodes, gpus_per_node=gpus, procs_per_node=procs, gpu_mem_bytes=_gpu_mem(args))


def _gpu_mem(args: argparse.Namespace) -> int | None:
    if args.gpu_mem is None:
        return None
    try:
        return parse_size(args.gpu_mem)
    except ValueError as err:
        raise UsageError(f"--gpu-mem: {err}") from None


def _plan_for(args: argparse.Namespace,
              run_dir: Path | None = None) -> tuple[LoadedRecipe, Plan, "SlurmSettings | None"]:
    """The recipe and its plan; for a Slurm target also the resolved Slurm settings (None on this machine)."""
    loaded = load_recipe(args.recipe, args.overrides)
    recipe = loaded.recipe
    root = Path(recipe.output.root).resolve()
    target = run_dir or next_run_dir(root, recipe.output.name or recipe.name)
    if _on_slurm(args):
        return loaded, *_slurm_plan(args, loaded, target)
    return loaded, make_plan(loaded, _resources(args), target), None


def _require_runnable(plan: Plan) -> None:
    if not plan.runnable:
        raise UsageError("this plan cannot run in this version:\n  " + "\n  ".join(plan.unsupported))


def _print_resume_notes(plan: Plan) -> None:
    """The re-plan's `resume: A -> B ranks ...` warnings (replan_for_resume), which a user resuming must see."""
    for warning in plan.warnings:
        if warning.startswith("resume:"):
            console.print(f"[yellow]{_escape(warning)}[/]")


# ------------------------------------------------------------------------------------------------------- slurm
def _on_slurm(args: argparse.Namespace) -> bool:
    """Slurm when asked for several nodes or a cluster profile; this machine otherwise."""
    return _nodes(args) > 1 or args.cluster is not None


def _slurm_plan(args: argparse.Namespace, loaded: LoadedRecipe, run_dir: Path) -> tuple[Plan, "SlurmSettings"]:
    """The plan for a Slurm job: resources from profile < recipe `cluster:` < flags, plus the sbatch text."""
    from cluster.slurm import resolve_settings

    settings = resolve_settings(args.cluster, loaded.recipe.cluster, nodes=_nodes(args),
                                gpus_per_node=args.gpus_per_node, partition=args.partition, time_limit=args.time,
                                procs=args.procs)
    plan = make_plan(loaded, _slurm_resources(args, settings), run_dir)
    return _with_sbatch(plan, settings, loaded), settings


def _with_sbatch(plan: Plan, settings: "SlurmSettings", loaded: LoadedRecipe) -> Plan:
    """The plan holding the batch script these settings render (also RUN_DIR/job.sbatch)."""
    import dataclasses

    from cluster.slurm import render_sbatch

    sbatch = render_sbatch(settings, plan.run_dir, _job_name(loaded), recipe_file=plan.recipe_file)
    return dataclasses.replace(plan, sbatch=sbatch)


def _slurm_resources(args: argparse.Namespace, settings: "SlurmSettings") -> Resources:
    """What a Slurm job runs on: the resolved settings' layout, and --gpu-mem for the planner."""
    return Resources(nodes=settings.nodes, gpus_per_node=settings.gpus_per_node,
                     procs_per_node=settings.tasks_per_node, gpu_mem_bytes=_gpu_mem(args))


def _write_slurm_files(run_dir: Path, plan: Plan, settings: "SlurmSettings") -> None:
    from cluster.slurm import CLUSTER_FILE, SBATCH_FILE
    from launcher.common.rundir import write_text_atomic

    write_text_atomic(run_dir / SBATCH_FILE, plan.sbatch or "", mode=0o755)
    write_json_atomic(run_dir / CLUSTER_FILE, settings.to_json())


def _submit_slurm(args: argparse.Namespace, resume: Path | None = None) -> int:
    """Check, write the run directory (plan.json, job.sbatch, cluster.json) and submit through submitit.

    With `resume`, the run directory exists: the job is re-planned on the requested (or recorded) Slurm resources and
    resubmitted; its ranks continue from the last checkpoint."""
    from cluster.slurm import load_profile, preflight, secret_values, submit

    if resume is None:
        loaded, plan, settings = _plan_for(args)  # validate everything before a directory exists
        assert settings is not None  # only Slurm targets come here
        _require_runnable(plan)
        run_dir = claim_run_dir(Path(plan.run_dir).parent, Path(plan.run_dir).name)
        if str(run_dir) != plan.run_dir:  # lost a race for the name: re-plan into the directory we own
            plan, settings = _slurm_plan(args, loaded, run_dir)
    else:
        run_dir = resume
        loaded, plan, settings = _slurm_replan(args, run_dir)
    settings, warnings = preflight(settings, run_dir)
    secrets, missing = secret_values(settings, loaded.recipe.cluster, load_profile(settings.profile))
    if missing:
        raise UsageError(f"cluster.env lists {', '.join(missing)}, to be passed from this environment, but "
                         "they are not set here: export them before `launch`")
    for warning in warnings:
        console.print(f"[yellow]warning:[/] {_escape(warning)}")
    plan = _with_sbatch(plan, settings, loaded)  # again: preflight may have filled in the default partition
    # Before anything is written: a tokenizer that cannot load fails here, not in a queued job.
    reason = _missing_preparation(loaded.recipe) if settings.tokenize_first else None
    if resume is not None:
        _print_resume_notes(plan)
    _write_plan(run_dir, plan, keep_previous=resume is not None)
    _write_slurm_files(run_dir, plan, settings)
    dependency = None
    if reason is not None:
        from cluster.slurm import submit_prepare

        prepare_id = submit_prepare(run_dir, settings, secrets, _job_name(loaded), reason)
        dependency = f"afterok:{prepare_id}"
        console.print(f"[bold]tokenize first[/]: {_escape(reason)}: CPU job {prepare_id} prepares it; the training "
                      f"job starts after it (--dependency={dependency})")
    job_id = submit(run_dir, settings, secrets, _job_name(loaded), dependency=dependency)
    console.print(f"[bold]run directory[/] {run_dir}")
    console.print(f"[bold green]submitted[/] Slurm job {job_id}: {settings.nodes} node(s) x {settings.tasks_per_node} "
                  f"rank(s), partition {settings.partition}, time {settings.time}")
    console.print(f"  follow: launch logs {run_dir} --follow    state: launch status {run_dir}    "
                  f"stop: launch cancel {run_dir}")
    print(job_id)  # stdout: the job id alone, for scripts
    return 0


def _missing_preparation(recipe: Recipe) -> str | None:
    """Why a CPU job must prepare the data before training (None: cached). Loads the tokenizer here, at submission."""
    from launcher.train.prepare import missing_preparation

    try:
        return missing_preparation(recipe)
    except (OSError, ValueError) as err:  # the ranks would fail the same way: say it before anything is queued
        raise UsageError(f"model.{'tokenizer' if recipe.model.tokenizer else 'path'}: cannot load the tokenizer "
                         f"({err})") from None


def _slurm_replan(args: argparse.Namespace, run_dir: Path) -> tuple[LoadedRecipe, Plan, "SlurmSettings"]:
    """A run being resubmitted: flags given now, else what the run was submitted with (RUN_DIR/cluster.json)."""
    from cluster.runs import ACTIVE_STATES, run_status
    from cluster.slurm import CLUSTER_FILE, resolve_settings

    status = run_status(run_dir)
    if status.state in ACTIVE_STATES:
        raise UsageError(f"{run_dir} still has Slurm job {status.job_id} {status.state}: two jobs would write one run "
                         f"directory; stop it first (launch cancel {run_dir})")
    previous = Plan.from_json(read_plan(run_dir))
    recipe = previous.typed_recipe()
    recorded = json.loads((run_dir / CLUSTER_FILE).read_text()) if (run_dir / CLUSTER_FILE).is_file() else {}
    gpus = args.gpus_per_node if args.gpus_per_node is not None else recorded.get("gpus_per_node")
    procs = args.procs
    if procs is None and not gpus and args.nodes is None:
        procs = recorded.get("ranks_per_node")
    settings = resolve_settings(args.cluster or recorded.get("profile"), recipe.cluster,
                                nodes=args.nodes if args.nodes is not None else recorded.get("nodes", 1),
                                gpus_per_node=gpus, partition=args.partition or recorded.get("partition"),
                                time_limit=args.time or recorded.get("time"), procs=procs)
    plan = replan_for_resume(previous, _slurm_resources(args, settings), run_dir)
    _require_runnable(plan)
    loaded = LoadedRecipe(recipe=plan.typed_recipe(), source=Path(plan.recipe_file), overrides=plan.overrides)
    return loaded, plan, settings


def _write_plan(run_dir: Path, plan: Plan, keep_previous: bool = False) -> None:
    """plan.json (+ ds_config.json); a resumed run's earlier plan is kept as plan-history/NNN.json."""
    if keep_previous and (run_dir / PLAN_FILE).is_file():
        history = run_dir / "plan-history"
        history.mkdir(exist_ok=True)
        number = len(list(history.glob("*.json"))) + 1
        write_json_atomic(history / f"{number:03d}.json", read_plan(run_dir))
    write_json_atomic(run_dir / PLAN_FILE, plan.to_json())
    write_strategy_files(run_dir, plan.to_json())


def _job_name(loaded: LoadedRecipe) -> str:
    return f"ftlaunch-{loaded.recipe.output.name or loaded.recipe.name}"


# -------------------------------------------------------------------------------------------------------- plan
def cmd_plan(argv: Sequence[str]) -> int:
    args = _plan_parser().parse_intermixed_args(argv)
    loaded, plan, settings = _plan_for(args)
    run_dir = Path(plan.run_dir)
    if not run_dir.exists():
        run_dir = claim_run_dir(run_dir.parent, run_dir.name)
    _write_plan(run_dir, plan)
    if settings is not None:
        _write_slurm_files(run_dir, plan, settings)
        _plan_slurm_checks(settings, run_dir)
    if args.json:
        print(json.dumps(plan.to_json(), indent=2))
        return 0
    from launcher.plan.report import print_plan  # rich tables; kept apart so --json stays lean

    print_plan(plan, loaded, Console(width=max(Console().width, 132)))  # the memory table needs the room
    return 0


def _plan_slurm_checks(settings: "SlurmSettings", run_dir: Path) -> None:
    """`launch plan` on a machine with Slurm checks the request as `launch` would; without Slurm it says so."""
    import shutil

    from cluster.slurm import preflight

    if shutil.which("sinfo") is None:
        console.print("[yellow]note:[/] Slurm is not on PATH here: partition and sizes not checked")
        return
    for warning in preflight(settings, run_dir, need_cluster=False)[1]:
        console.print(f"[yellow]warning:[/] {_escape(warning)}")


# --------------------------------------------------------------------------------------------------------- run
def _resume_dir(args: argparse.Namespace) -> Path:
    if args.resume != "latest":
        run_dir = Path(args.resume).resolve()
        read_plan(run_dir)  # clear error when it is not a run directory
        return run_dir
    if args.recipe is None:
        raise UsageError("--resume without a run directory needs the recipe: launch RECIPE --resume")
    loaded = load_recipe(args.recipe, args.overrides)
    name = loaded.recipe.output.name or loaded.recipe.name
    runs = [r for r in runs_of(Path(loaded.recipe.output.root).resolve(), name) if (r / "checkpoints").is_dir()]
    if not runs:
        raise UsageError(f"no run of {name!r} with checkpoints under {loaded.recipe.output.root}: nothing to resume")
    return runs[-1]


def cmd_run(argv: Sequence[str]) -> int:
    args = _run_parser().parse_intermixed_args(argv)
    if args.resume is not None and "=" in args.resume and not Path(args.resume).is_dir():
        args.overrides.insert(0, args.resume)  # `--resume key=value`: an override, not a run directory
        args.resume = "latest"
    if args.resume is None and args.recipe is None:
        raise UsageError("launch needs a recipe (launch RECIPE ...) or a run to resume (launch --resume RUN_DIR)")
    if args.resume is None and _on_slurm(args):
        return _submit_slurm(args)
    if args.resume is not None:
        run_dir = _resume_dir(args)
        if args.overrides:
            raise UsageError("overrides cannot change a run being resumed: its plan.json is the contract")
        from cluster.slurm import CLUSTER_FILE

        was_slurm = (run_dir / CLUSTER_FILE).is_file()
        if _on_slurm(args) or (was_slurm and not _layout_given(args)):
            return _submit_slurm(args, resume=run_dir)  # a Slurm run goes back to Slurm unless told otherwise
        plan = Plan.from_json(read_plan(run_dir))
        if _layout_given(args) or was_slurm:
            plan = replan_for_resume(plan, _resources(args), run_dir)  # here, on the resources named now
            _require_runnable(plan)
            _write_plan(run_dir, plan, keep_previous=True)
            _print_resume_notes(plan)
        console.print(f"[bold]resuming[/] {run_dir}")
    else:
        loaded, plan, _ = _plan_for(args)  # validate and check everything before a directory exists
        _require_runnable(plan)
        run_dir = claim_run_dir(Path(plan.run_dir).parent, Path(plan.run_dir).name)
        if str(run_dir) != plan.run_dir:  # lost a race for the name: re-plan into the directory we own
            loaded, plan, _ = _plan_for(args, run_dir)
        _write_plan(run_dir, plan)
        console.print(f"[bold]run directory[/] {run_dir}")
    from cluster.local import run_local  # imports torch only when training really starts

    return run_local(plan)


# ------------------------------------------------------------------------------------------------------ export
def cmd_export(argv: Sequence[str]) -> int:
    args = _export_parser().parse_args(argv)
    from launcher.train.export import export_run

    out = export_run(args.run_dir.resolve(), merge=args.merge, out=args.out)
    console.print(f"[bold green]exported[/] {out}")
    return 0


# ------------------------------------------------------------------------------------------- run management
def _run_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory, or a run name under the output root (--root)")
    parser.add_argument("--root", type=Path, default=Path("runs"), help="output root holding run directories")


def cmd_runs(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="launch runs", description="Recent runs under an output root.")
    parser.add_argument("--root", type=Path, default=Path("runs"), help="output root (default ./runs)")
    parser.add_argument("--limit", type=int, default=20, help="most recent N runs (default 20)")
    args = parser.parse_args(argv)
    from cluster.runs import list_runs, runs_table

    Console(width=max(Console().width, 132)).print(runs_table(list_runs(args.root.resolve(), args.limit)))
    return 0


def cmd_status(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="launch status", description="State of one run (Slurm or local).")
    _run_arg(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    from cluster.runs import find_run, run_status, status_table

    status = run_status(find_run(args.run, args.root))
    if args.json:
        print(json.dumps(status.to_json(), indent=2))
    else:
        Console(width=max(Console().width, 132)).print(status_table(status))
    return 0


def cmd_logs(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="launch logs", description="Print (or follow) one rank's log.")
    _run_arg(parser)
    parser.add_argument("--rank", type=int, default=0, help="rank whose log to show (default 0)")
    parser.add_argument("--follow", "-f", action="store_true", help="keep printing until the run ends (Ctrl-C stops)")
    parser.add_argument("--lines", "-n", type=int, default=None, help="only the last N lines")
    args = parser.parse_args(argv)
    from cluster.runs import find_run, show_log

    return show_log(find_run(args.run, args.root), args.rank, follow=args.follow, lines=args.lines)


def cmd_cancel(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="launch cancel", description="Cancel a run's Slurm job(s).")
    _run_arg(parser)
    args = parser.parse_args(argv)
    from cluster.runs import cancel_run, find_run

    for line in cancel_run(find_run(args.run, args.root)):
        console.print(_escape(line))
    return 0


# -------------------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = {"plan": cmd_plan, "export": cmd_export, "runs": cmd_runs, "status": cmd_status, "logs": cmd_logs,
               "cancel": cmd_cancel}.get(argv[0] if argv else "", cmd_run)
    if command is not cmd_run:
        argv = argv[1:]
    try:
        return command(argv)
    except RecipeError as err:
        console.print("[bold red]error:[/] " + _escape(str(err)))
        return EXIT_BAD_INPUT
    except (UsageError, FileNotFoundError, FileExistsError) as err:
        console.print("[bold red]error:[/] " + _escape(str(err)))
        return EXIT_BAD_INPUT
    except Exception as err:  # SlurmError, without importing cluster.slurm for every command
        if type(err).__name__ != "SlurmError":
            raise
        console.print("[bold red]error:[/] " + _escape(str(err)))
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return EXIT_INTERRUPTED


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
