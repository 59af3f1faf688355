"""`launch export RUN_DIR [--merge] [--out DIR]`: a run's latest checkpoint as one Hugging Face directory, OUT itself
(the adapter, the full model, or with --merge the merged model), with its model card."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from launcher.cli.console import console


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch export", description="Write a run's latest checkpoint as an HF model.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--merge", action="store_true", help="fold a LoRA adapter into the base weights: OUT is the "
                        "merged model")
    parser.add_argument("--out", type=Path, default=None, help="the directory to write, new or empty; it is what "
                        "from_pretrained loads (default RUN_DIR/export)")
    parser.add_argument("--verbose", action="store_true", help="show the libraries' progress bars and warnings")
    return parser


def cmd_export(argv: Sequence[str]) -> int:
    args = parser().parse_args(argv)
    from launcher.train.export import export_run  # the rank side: torch, only for this command
    from launcher.train.model_card import output_kind

    out = export_run(args.run_dir.resolve(), merge=args.merge, out=args.out, quiet=not args.verbose)
    what = "merged model" if args.merge else output_kind(out)
    console.print(f"[bold green]exported[/] the {what} to {out}")
    return 0
