"""`launch export RUN_DIR [--merge] [--out DIR]`: a run's latest checkpoint as a Hugging Face model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from launcher.cli.console import console


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch export", description="Write a run's latest checkpoint as an HF model.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--merge", action="store_true", help="fold a LoRA adapter into the base weights")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default RUN_DIR/export)")
    return parser


def cmd_export(argv: Sequence[str]) -> int:
    args = parser().parse_args(argv)
    from launcher.train.export import export_run  # the rank side: torch, only for this command

    out = export_run(args.run_dir.resolve(), merge=args.merge, out=args.out)
    console.print(f"[bold green]exported[/] {out}")
    return 0
