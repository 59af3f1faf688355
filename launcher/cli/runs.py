"""`launch runs | status RUN | logs RUN | cancel RUN`: the runs under an output root, here or on Slurm."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from rich.markup import escape

from cluster.executor import Executor
from cluster.follow import follow, show_log
from cluster.runs import find_run, list_runs, runs_table, status_table
from launcher.cli.args import UsageError
from launcher.cli.console import console, wide_console


def _run_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory, or a run name under the output root (--root)")
    parser.add_argument("--root", type=Path, default=Path("runs"), help="output root holding run directories")


def cmd_runs(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="launch runs", description="Recent runs under an output root.")
    parser.add_argument("--root", type=Path, default=Path("runs"), help="output root (default ./runs)")
    parser.add_argument("--limit", type=int, default=20, help="most recent N runs (default 20)")
    args = parser.parse_args(argv)
    wide_console().print(runs_table(list_runs(args.root.resolve(), args.limit)))
    return 0


def cmd_status(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="launch status", description="State of one run (Slurm or local).")
    _run_arg(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    from cluster.sweep import is_sweep_dir

    for candidate in (Path(args.run), args.root / args.run):
        if is_sweep_dir(candidate):
            from launcher.cli.sweep import sweep_status

            return sweep_status(candidate.resolve(), args.json)
    status = Executor.status(find_run(args.run, args.root))
    if args.json:
        print(json.dumps(status.to_json(), indent=2))
    else:
        wide_console().print(status_table(status))
    return 0


def cmd_logs(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="launch logs", description="Print (or follow) one rank's log.")
    _run_arg(parser)
    parser.add_argument("--rank", type=int, default=0, help="rank whose log to show (default 0)")
    parser.add_argument("--follow", "-f", action="store_true",
                        help="keep printing, with the run's state changes, until it ends; exit with its exit code "
                             "(Ctrl-C stops following, not the run)")
    parser.add_argument("--lines", "-n", type=int, default=None, help="only the last N lines")
    args = parser.parse_args(argv)
    if args.lines is not None and args.lines < 0:
        raise UsageError(f"--lines must be >= 0 (got {args.lines})")
    run_dir = find_run(args.run, args.root)
    if args.follow:
        return follow(run_dir, rank=args.rank, last_lines=args.lines, say=say)
    return show_log(run_dir, args.rank, lines=args.lines)


def say(line: str) -> None:
    """A follow's state lines, on stderr (stdout holds the log)."""
    console.print(escape(line))


def cmd_cancel(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="launch cancel", description="Cancel a run's Slurm job(s).")
    _run_arg(parser)
    args = parser.parse_args(argv)
    from cluster.sweep import is_sweep_dir

    for candidate in (Path(args.run), args.root / args.run):
        if is_sweep_dir(candidate):
            from launcher.cli.sweep import sweep_cancel

            for line in sweep_cancel(candidate.resolve()):
                console.print(escape(line))
            return 0
    for line in Executor.cancel(find_run(args.run, args.root)):
        console.print(escape(line))
    return 0
