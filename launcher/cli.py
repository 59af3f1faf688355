"""The `launch` command.

    launch RECIPE [key.path=value ...] [--procs N] [--resume [RUN_DIR]]     train on this machine
    launch plan RECIPE [key.path=value ...] [--nodes N] [--gpus-per-node G] [--procs N] [--json]
    launch export RUN_DIR [--merge] [--out DIR]

Planning side: this module imports no torch, transformers, peft or deepspeed (a test checks). Training starts in
`launcher.job`, imported only when a run begins.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from rich.console import Console

from launcher.ds_config import write_strategy_files
from launcher.plan import Plan, Resources, local_gpu_count, make_plan
from launcher.plan_memory import parse_size
from launcher.recipe import LoadedRecipe, RecipeError, load_recipe
from launcher.rundir import PLAN_FILE, claim_run_dir, next_run_dir, read_plan, runs_of, write_json_atomic

SUBCOMMANDS = ("plan", "export")
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

console = Console(stderr=True, highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------------------------------- arguments
def _add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="recipe overrides, e.g. optim.lr=1e-4")
    parser.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1: this machine)")
    parser.add_argument("--gpus-per-node", type=int, default=None,
                        help="GPUs per node (default: the GPUs visible here; 0 trains on CPU)")
    parser.add_argument("--procs", type=int, default=None,
                        help="ranks per node (default: one per GPU, or 1 on CPU)")
    parser.add_argument("--gpu-mem", default=None, metavar="SIZE",
                        help="memory of one GPU, e.g. 80GiB: enables fits/auto choices of the memory planner")


def _run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch", description="Train from a recipe on this machine.",
                                     epilog="other commands: launch plan RECIPE ..., launch export RUN_DIR ...")
    _add_recipe_args(parser)
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="RUN_DIR",
                        help="continue the latest run of this recipe, or the given run directory")
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


def _resources(args: argparse.Namespace) -> Resources:
    if args.nodes < 1:
        raise UsageError(f"--nodes must be >= 1 (got {args.nodes})")
    gpus = local_gpu_count() if args.gpus_per_node is None else args.gpus_per_node
    if gpus < 0:
        raise UsageError(f"--gpus-per-node must be >= 0 (got {gpus})")
    procs = args.procs if args.procs is not None else max(gpus, 1)
    if procs < 1:
        raise UsageError(f"--procs must be >= 1 (got {procs})")
    if gpus and procs > gpus:
        raise UsageError(f"--procs({procs}) > --gpus-per-node({gpus}): one rank per GPU at most")
    gpu_mem = None
    if args.gpu_mem is not None:
        try:
            gpu_mem = parse_size(args.gpu_mem)
        except ValueError as err:
            raise UsageError(f"--gpu-mem: {err}") from None
    return Resources(nodes=args.nodes, gpus_per_node=gpus, procs_per_node=procs, gpu_mem_bytes=gpu_mem)


def _plan_for(args: argparse.Namespace, run_dir: Path | None = None) -> tuple[LoadedRecipe, Plan]:
    loaded = load_recipe(args.recipe, args.overrides)
    recipe = loaded.recipe
    root = Path(recipe.output.root).resolve()
    target = run_dir or next_run_dir(root, recipe.output.name or recipe.name)
    return loaded, make_plan(loaded, _resources(args), target)


# -------------------------------------------------------------------------------------------------------- plan
def cmd_plan(argv: Sequence[str]) -> int:
    args = _plan_parser().parse_intermixed_args(argv)
    loaded, plan = _plan_for(args)
    run_dir = Path(plan.run_dir)
    if not run_dir.exists():
        run_dir = claim_run_dir(run_dir.parent, run_dir.name)
    write_json_atomic(run_dir / PLAN_FILE, plan.to_json())
    write_strategy_files(run_dir, plan.to_json())
    if args.json:
        print(json.dumps(plan.to_json(), indent=2))
        return 0
    from launcher.report import print_plan  # rich tables; kept apart so --json stays lean

    print_plan(plan, loaded, Console(width=max(Console().width, 132)))  # the memory table needs the room
    return 0


# --------------------------------------------------------------------------------------------------------- run
def _resume_dir(args: argparse.Namespace) -> Path:
    if args.resume != "latest":
        run_dir = Path(args.resume).resolve()
        read_plan(run_dir)  # clear error when it is not a run directory
        return run_dir
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
    if args.resume is not None:
        run_dir = _resume_dir(args)
        if args.overrides:
            raise UsageError("overrides cannot change a run being resumed: its plan.json is the contract")
        plan = Plan.from_json(read_plan(run_dir))
        console.print(f"[bold]resuming[/] {run_dir}")
    else:
        loaded, plan = _plan_for(args)  # validate and check everything before a directory exists
        if not plan.runnable:
            raise UsageError("this plan cannot run in this version:\n  " + "\n  ".join(plan.unsupported))
        run_dir = claim_run_dir(Path(plan.run_dir).parent, Path(plan.run_dir).name)
        if str(run_dir) != plan.run_dir:  # lost a race for the name: re-plan into the directory we own
            loaded, plan = _plan_for(args, run_dir)
        write_json_atomic(run_dir / PLAN_FILE, plan.to_json())
        write_strategy_files(run_dir, plan.to_json())
        console.print(f"[bold]run directory[/] {run_dir}")
    from cluster.local import run_local  # imports torch only when training really starts

    return run_local(plan)


# ------------------------------------------------------------------------------------------------------ export
def cmd_export(argv: Sequence[str]) -> int:
    args = _export_parser().parse_args(argv)
    from launcher.checkpoint import export_run

    out = export_run(args.run_dir.resolve(), merge=args.merge, out=args.out)
    console.print(f"[bold green]exported[/] {out}")
    return 0


# -------------------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = {"plan": cmd_plan, "export": cmd_export}.get(argv[0] if argv else "", cmd_run)
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
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return EXIT_INTERRUPTED


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
