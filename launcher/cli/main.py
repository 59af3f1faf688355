"""The `launch` command.

    launch RECIPE [key.path=value ...] [--procs N]                            train on this machine
    launch --resume RUN_DIR [--procs N | --nodes N ...]   continue a run, on the same or other resources
    launch plan RECIPE [key.path=value ...] [--nodes N] [--gpus-per-node G] [--procs N] [--json]
    launch export RUN_DIR [--merge] [--out DIR]
    launch baseline RECIPE [key.path=value ...] [--out RUN_DIR] [--json]   baselines to beat: baseline.json
    launch import AXOLOTL.yaml [--out RECIPE.yaml] [--force]      an axolotl config as a recipe, with what did not map
    launch RECIPE --nodes N | --cluster NAME [--partition P] [--time T] [--gpus-per-node G] [--follow]   submit to Slurm
    launch runs [--root DIR] | status RUN | logs RUN [--rank R] [--follow] | cancel RUN        run management
    launch SWEEP | plan SWEEP | report SWEEP_DIR | status SWEEP_DIR      a recipe with `sweep:`: every trial, mean ± std

One module per command (launcher/cli/); they parse flags, call the planning side or an executor (cluster/executor.py)
and print. Planning side: no torch, transformers, peft or deepspeed here (tests/test_layering.py); training starts in
`launcher.train.job`, in a child process.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

from cluster.errors import SubmitError
from launcher.cli.args import UsageError
from launcher.cli.console import console, error
from launcher.cli.baseline import cmd_baseline
from launcher.cli.export import cmd_export
from launcher.cli.import_ import cmd_import
from launcher.cli.plan import cmd_plan
from launcher.cli.run import cmd_run
from launcher.cli.runs import cmd_cancel, cmd_logs, cmd_runs, cmd_status
from launcher.cli.sweep import cmd_report
from launcher.common.exits import EXIT_BAD_INPUT, EXIT_CTRL_C
from launcher.common.version import version
from launcher.config.recipe import RecipeError

COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "plan": cmd_plan, "export": cmd_export, "import": cmd_import, "runs": cmd_runs, "status": cmd_status,
    "logs": cmd_logs, "cancel": cmd_cancel, "report": cmd_report, "baseline": cmd_baseline,
}
"""Subcommands; anything else is `launch RECIPE ...` (cmd_run)."""


OVERVIEW = """\
launch: fine-tune a model from a recipe, here or on Slurm.

commands (one example each; `launch COMMAND --help` for its flags):
  launch RECIPE [key.path=value ...]     train on this machine       launch recipes/demo.yaml optim.lr=1e-4
  launch RECIPE --nodes N | --cluster C  submit to Slurm (--follow)  launch recipes/llama3-70b-qlora.yaml --nodes 4
  launch --resume [RUN_DIR]              continue from a checkpoint  launch --resume runs/demo --procs 2
  launch plan RECIPE [--nodes N]         check and size, run nothing launch plan recipes/demo.yaml --nodes 4
  launch baseline RECIPE                 TF-IDF/majority/copy scores launch baseline recipes/demo-classify.yaml
  launch runs [--root DIR]               recent runs                 launch runs
  launch status RUN | SWEEP_DIR          state, step, metrics        launch status runs/demo
  launch logs RUN [--rank R] [--follow]  one rank's log              launch logs runs/demo --follow
  launch cancel RUN | SWEEP_DIR          cancel its Slurm job(s)     launch cancel runs/demo
  launch export RUN_DIR [--merge]        checkpoint -> HF model      launch export runs/demo --merge
  launch import AXOLOTL.yaml             axolotl config -> recipe    launch import qlora.yml --out r.yaml
  launch report SWEEP_DIR                sweep mean +- std table     launch report runs/demo-sweep
  launch --version

training flags (launch RECIPE ...):
"""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(OVERVIEW, end="")
        return cmd_run(["--help"])
    if argv[:1] == ["--version"]:
        print(f"ftlaunch {version()}")
        return 0
    command = COMMANDS.get(argv[0] if argv else "", cmd_run)
    if command is not cmd_run:
        argv = argv[1:]
    try:
        return command(argv)
    except (RecipeError, UsageError, SubmitError, FileNotFoundError, FileExistsError) as err:
        error(str(err))
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return EXIT_CTRL_C
    except BrokenPipeError:
        # `launch logs RUN | head`: the reader left, which is not an error. stdout is pointed at /dev/null so that
        # the interpreter's final flush does not raise (and print) the same error again (Python docs, "Note on SIGPIPE").
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
