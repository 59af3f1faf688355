"""Flags shared by `launch` and `launch plan`, and the executor they name: this machine, or Slurm when several nodes
or a cluster profile are asked for."""

from __future__ import annotations

import argparse

from cluster.executor import Executor
from cluster.local import LocalExecutor
from cluster.slurm_executor import SlurmExecutor, SlurmRequest
from launcher.config.schema import Recipe
from launcher.plan.build import local_gpu_count
from launcher.plan.resources import Resources


class UsageError(Exception):
    """Bad command-line input (not a recipe problem)."""


def add_recipe_args(parser: argparse.ArgumentParser, recipe_required: bool = True) -> None:
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


def nodes(args: argparse.Namespace) -> int:
    count = 1 if args.nodes is None else args.nodes
    if count < 1:
        raise UsageError(f"--nodes must be >= 1 (got {count})")
    return count


def layout_given(args: argparse.Namespace) -> bool:
    """Whether the command line names resources (a resumed run otherwise keeps the ones it was planned for)."""
    return any(v is not None for v in (args.nodes, args.procs, args.gpus_per_node, args.cluster))


def on_slurm(args: argparse.Namespace) -> bool:
    """Slurm when asked for several nodes or a cluster profile; this machine otherwise."""
    return nodes(args) > 1 or args.cluster is not None or getattr(args, "offline", False)


def parse_size(text: str) -> int:
    """`80GiB`, `80GB`, `141G`, `24576MiB` -> bytes (GB = 10^9, GiB and bare G = 2^30, as nvidia-smi prints GiB)."""
    units = {"tib": 2**40, "gib": 2**30, "mib": 2**20, "tb": 10**12, "gb": 10**9, "mb": 10**6, "t": 2**40,
             "g": 2**30, "m": 2**20, "": 1}
    cleaned = text.strip().lower().replace(" ", "")
    number = cleaned.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = cleaned[len(number):]
    try:
        value = float(number) * units[unit]
    except (KeyError, ValueError):
        value = float("nan")
    if not 2**20 <= value <= 2**50:  # also NaN and inf (`1e400GiB`): no GPU has under 1 MiB or over 1 PiB
        raise ValueError(f"cannot read a memory size from {text!r}: write e.g. 80GiB, 141GB or 24576MiB")
    return int(value)


def gpu_mem(args: argparse.Namespace) -> int | None:
    if args.gpu_mem is None:
        return None
    try:
        return parse_size(args.gpu_mem)
    except ValueError as err:
        raise UsageError(f"--gpu-mem: {err}") from None


def local_resources(args: argparse.Namespace) -> Resources:
    gpus = local_gpu_count() if args.gpus_per_node is None else args.gpus_per_node
    if gpus < 0:
        raise UsageError(f"--gpus-per-node must be >= 0 (got {gpus})")
    procs = args.procs if args.procs is not None else max(gpus, 1)
    if procs < 1:
        raise UsageError(f"--procs must be >= 1 (got {procs})")
    if gpus and procs > gpus:
        raise UsageError(f"--procs({procs}) > --gpus-per-node({gpus}): one rank per GPU at most")
    return Resources(nodes=nodes(args), gpus_per_node=gpus, procs_per_node=procs, gpu_mem_bytes=gpu_mem(args))


def _missing_preparation(recipe: Recipe) -> str | None:
    """Why a CPU job must prepare the data before training (None: cached). Loads the tokenizer, at submission."""
    from launcher.train.prepare import missing_preparation

    try:
        return missing_preparation(recipe)
    except (OSError, ValueError) as err:  # the ranks would fail the same way: say it before anything is queued
        raise UsageError(f"model.{'tokenizer' if recipe.model.tokenizer else 'path'}: cannot load the tokenizer "
                         f"({err})") from None


def slurm_executor(args: argparse.Namespace, *, resume: bool = False) -> SlurmExecutor:
    """Flags given; for a resume, None where not given (the executor takes the run's recorded layout)."""
    request = SlurmRequest(profile=args.cluster, nodes=args.nodes if resume else nodes(args),
                           gpus_per_node=args.gpus_per_node, procs=args.procs, partition=args.partition,
                           time=args.time, gpu_mem_bytes=gpu_mem(args), offline=getattr(args, "offline", False))
    return SlurmExecutor(request, missing_preparation=_missing_preparation)


def executor(args: argparse.Namespace) -> Executor:
    return slurm_executor(args) if on_slurm(args) else LocalExecutor(local_resources(args))
