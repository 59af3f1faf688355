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
    title = (f"memory per GPU (GiB): {memory['params_total'] / 1e9:.2f}B params"
             f" ({memory['params_active'] / 1e9:.2f}B active), {memory['trainable'] / 1e6:.1f}M trainable"
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
    table.caption = f"* chosen: {memory.get('reason')}" if memory.get("chosen") else memory.get("reason")
    return table
