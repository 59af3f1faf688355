"""`launch baseline RECIPE [key.path=value ...] [--out RUN_DIR] [--json]`: the baselines a fine-tuned model must beat,
fitted on the recipe's train split and scored on its eval split (launcher/train/baseline.py), written as
baseline.json.

Where it goes: by default into the run directory the next `launch` of the recipe takes (`output.root/NAME`, or the
first free `NAME-N`, the one `launch plan` shows), created if need be and left unclaimed: a directory holding only a
plan and a baseline is still a planned run (launcher/common/rundir.is_fresh), so `launch baseline R` then `launch R`
gives one directory with both, and the run can set its final figures beside the baseline's. `--out RUN_DIR` writes
into any directory instead, e.g. a finished run's, and the table then shows that run's final eval values too.
No torch: it runs on a login node (tests/train/test_baseline.py checks).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

from cluster.executor import require_data
from launcher.cli.args import UsageError
from launcher.cli.console import info, wide_console
from launcher.common.rundir import next_run_dir
from launcher.common.sweep_report import final_values
from launcher.config.recipe import load_recipe


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch baseline",
                                     description="Fit simple baselines on the recipe's train split, score them on its "
                                                 "eval split and write baseline.json into the run directory.")
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="recipe overrides, e.g. data.max_rows=")
    parser.add_argument("--out", type=Path, default=None, metavar="RUN_DIR",
                        help="write baseline.json here (e.g. beside a finished run). Default: the run directory the "
                             "next `launch RECIPE` takes")
    parser.add_argument("--json", action="store_true", help="print baseline.json instead of a table")
    return parser


def cmd_baseline(argv: Sequence[str]) -> int:
    args = parser().parse_intermixed_args(argv)
    loaded = load_recipe(args.recipe, args.overrides)
    recipe = loaded.recipe
    require_data(loaded)  # as `launch` does: missing files named by key, a Hub dataset downloaded into the cache
    from launcher.train.baseline import run_baseline, write_baseline  # reads the data (no torch, but not light)
    from launcher.train.data import DataError

    if args.out is not None:
        run_dir = args.out
    elif recipe.sweep is not None:
        # Every trial shares the recipe's data: one baseline, in the sweep directory the next `launch SWEEP` continues
        # (same fingerprint), where `launch report` draws it as the bar to clear.
        from cluster.sweep import open_sweep_dir
        from launcher.config.sweep import load_sweep

        run_dir = open_sweep_dir(load_sweep(loaded.source, loaded.overrides))[0]
    else:
        run_dir = next_run_dir(Path(recipe.output.root).resolve(), recipe.output.name or recipe.name)
    try:
        report = run_baseline(recipe)
    except DataError as err:
        raise UsageError(str(err)) from None
    path = write_baseline(report, run_dir.resolve())
    if args.json:
        print(json.dumps(json.loads(path.read_text()), indent=2))
    else:
        print_report(report.to_json(), final_values(run_dir, _keys(report.baselines)))
    info("written", str(path))
    return 0


def _keys(baselines: dict[str, dict[str, float]]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(key for values in baselines.values() for key in values))


def print_report(baseline: dict[str, Any], run_final: dict[str, float | None]) -> None:
    """One row per metric, one column per baseline (and the run's final value where the directory has one)."""
    from rich.table import Table

    names = list(baseline["baselines"])
    shown_run = any(v is not None for v in run_final.values())
    table = Table(title=f"baselines of {baseline['recipe']} ({baseline['task']}): {baseline['n_train']} train rows, "
                        f"{baseline['n_eval']} eval rows")
    table.add_column("metric")
    for name in names:
        table.add_column(name, justify="right")
    if shown_run:
        table.add_column("this run (final)", justify="right")
    for key in _keys(baseline["baselines"]):
        row = [key] + [_fmt(baseline["baselines"][name].get(key)) for name in names]
        table.add_row(*row, *([_fmt(run_final.get(key))] if shown_run else []))
    console = wide_console()
    console.print(table)
    for name, note in baseline.get("notes", {}).items():
        console.print(f"  [bold]{name}[/]: {note}")


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"
