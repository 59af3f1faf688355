"""Human-readable `launch plan` output (rich). Planning side: no torch."""

from __future__ import annotations

import shlex

import yaml
from rich.console import Console
from rich.panel import Panel
from rich.syntax import Syntax
from rich.table import Table

from launcher.plan import Plan
from launcher.recipe import LoadedRecipe


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
    console.print(layout)
    for warning in plan.warnings:
        console.print(f"[yellow]note:[/] {warning}")
