"""`launch plan RECIPE ...`: resolve and check everything, write the run directory's plan files, start nothing."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from launcher.cli import args as cli_args
from launcher.cli.console import info, warnings, wide_console
from launcher.config.recipe import load_recipe


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch plan", description="Resolve a recipe into a plan; runs nothing.")
    cli_args.add_recipe_args(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--offline", action="store_true",
                        help="plan a Slurm job for a cluster this machine does not reach (or is not on): the profile, "
                             "recipe and flags only, no sinfo checks; e.g. --cluster h100-ib --nodes 4 --offline")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="also write the run directory (plan.json, ds_config.json, job.sbatch) to DIR; "
                             "`launch --resume DIR` or `sbatch DIR/job.sbatch` runs it. Default: write nothing")
    return parser


def cmd_plan(argv: Sequence[str]) -> int:
    if not [a for a in argv if not a.startswith("-")] and not {"-h", "--help"} & set(argv):
        # argparse would say "the following arguments are required: recipe, key.path=value"; overrides are optional.
        raise cli_args.UsageError("launch plan needs a recipe: `launch plan RECIPE.yaml [key.path=value ...] "
                                  "[--nodes N]` (e.g. `launch plan recipes/demo.yaml`)")
    args = parser().parse_intermixed_args(argv)
    loaded = load_recipe(args.recipe, args.overrides)
    if loaded.recipe.sweep is not None:
        if args.out is not None:
            raise cli_args.UsageError("--out plans one run directory; a sweep's trials are planned by `launch "
                                      "SWEEP` into its sweep directory")
        from launcher.cli.sweep import plan_sweep

        return plan_sweep(args, loaded, args.json)
    run, request_warnings = cli_args.executor(args).dry_run(loaded, args.out)
    warnings(request_warnings)
    if args.out is not None:
        info("written", f"{run.run_dir}: launch --resume {run.run_dir} runs it")
    if args.json:
        print(json.dumps(run.plan.to_json(), indent=2))
        return 0
    from launcher.plan.report import print_plan  # rich tables; kept apart so --json stays lean

    print_plan(run.plan, loaded, wide_console())
    return 0
