"""Human-readable `launch plan` output (rich). Planning side: no torch."""

from __future__ import annotations

import shlex

import yaml
from rich.console import Console
from rich.panel import Panel
from rich.syntax import Syntax
from rich.table import Table

from launcher.plan.build import Plan
from launcher.plan.schedules import schedule_rows
from launcher.config.recipe import LoadedRecipe
from launcher.strategies import STRATEGIES


def print_plan(plan: Plan, loaded: LoadedRecipe, console: Console) -> None:
    """Resolved recipe, layout, strategy and commands."""
    files = " <- ".join(str(f) for f in loaded.files)
    console.print(Panel(Syntax(yaml.safe_dump(plan.recipe, sort_keys=False), "yaml", word_wrap=True),
                        title=f"resolved recipe ({files})", expand=False))
    layout = Table(title="layout", show_header=False)
    layout.add_row("run directory", plan.run_dir)
    layout.add_row("nodes x ranks", f"{plan.nodes} x {plan.procs_per_node} = world size {plan.world_size}")
    layout.add_row("device / backend", f"{plan.device} / {plan.backend}")
    layout.add_row("strategy", f"{plan.strategy} — {plan.strategy_reason}")
    layout.add_row("launch command", shlex.join(plan.command))
    layout.add_row("per-rank command", shlex.join(plan.rank_command))
    for label, text in schedule_rows(plan.schedules):
        layout.add_row(label, text)
    console.print(layout)
    if plan.strategy_config is not None:
        import json

        title = {"deepspeed": "DeepSpeed config (RUN_DIR/ds_config.json)", "fsdp": "FSDP settings"}.get(
            STRATEGIES[plan.strategy].options or "", "DDP settings")
        console.print(Panel(Syntax(json.dumps(plan.strategy_config, indent=2), "json"), title=title, expand=False))
    if plan.sbatch is not None:
        console.print(Panel(Syntax(plan.sbatch, "bash", word_wrap=True),
                            title="Slurm batch script (RUN_DIR/job.sbatch; `launch` submits the same job)", expand=False))
    if plan.memory is not None:
        console.print(memory_table(plan))
    for warning in plan.warnings:
        console.print(f"[yellow]note:[/] {warning}")
    for reason in plan.unsupported:
        console.print(f"[bold red]cannot run in this version:[/] {reason}")


def memory_table(plan: Plan) -> Table:
    """Per-GPU estimate per strategy (GiB), and whether it fits the GPU memory given."""
    memory = plan.memory or {}
    gpu_mem = memory.get("gpu_mem_bytes")
    per = "GPU" if plan.device == "cuda" else "rank (CPU memory)"
    title = (f"memory per {per} (GiB): parameters {count(memory['params_total'])} total, "
             f"{count(memory['params_active'])} active, {count(memory['trainable'])} trainable"
             + (f", GPU {gpu_mem / 2**30:.0f} GiB" if gpu_mem else ""))
    table = Table(title=title)
    table.add_column("strategy", no_wrap=True)
    for column in ("weights", "grads", "optim", "activ", "logits", "frame", "total", "host/node", "fits"):
        table.add_column(column, justify="right")
    for row in memory.get("strategies", []):
        b = row["bytes"]
        gib = [f"{b[k] / 2**30:.1f}" for k in ("weights", "grads", "optimizer", "activations", "logits",
                                                 "framework", "total")]
        fits = {True: "[green]yes[/]", False: "[red]no[/]", None: "-"}[row["fits"]]
        marker = " *" if row["name"] == memory.get("chosen") else ""
        table.add_row(row["name"] + marker, *gib, f"{row['host_per_node'] / 2**30:.0f}", fits)
    caption = f"* chosen: {memory.get('reason')}" if memory.get("chosen") else memory.get("reason") or ""
    # What the short column names hold (launcher/plan/memory_model.py derives each).
    table.caption = (caption + ("\n" if caption else "") + "weights, grads, optim(izer states), activ(ations), logits: "
                     "per rank; frame: CUDA context, NCCL buffers and allocator slack; host/node: CPU memory per node "
                     "(GiB); fits: total within the GPU memory given (--gpu-mem)")
    return table


def count(n: float) -> str:
    """One unit per figure, so that 8.03B and 8030.3M are never printed side by side for the same kind of number."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"
